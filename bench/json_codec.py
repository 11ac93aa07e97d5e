#!/usr/bin/env python
"""The operator's JSON: the standard library against orjson on what the operator decodes and encodes most.

A trainer pod's watch event (MODIFIED, Running; the pod as the Job controller makes it from the Job that
``render_children`` gives for the scale benchmark's SFTJob), the Job it creates (encoded as the create's
body, decoded as its answer) and a ConfigMap as a PartialObjectMetadata (what a watch by metadata sends).
Each is timed in CPU time (a busy machine slows it less than wall time) over --rounds calls, best of --repeat.

    python bench/json_codec.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "contract"), str(ROOT / "operator"), str(ROOT / "trainer_image")]

import orjson  # noqa: E402

from sft_operator.api.types import SFTJob  # noqa: E402
from sft_operator.core.decisions import prepare_job  # noqa: E402
from sft_operator.core.render import render_children  # noqa: E402

STAMP = "2026-12-07T10:00:00Z"


def samples() -> dict[str, Any]:
    sftjob = SFTJob.model_validate({
        "apiVersion": "sft.dev/v1alpha1", "kind": "SFTJob",
        "metadata": {"name": "sft-00042", "namespace": "opbench-op", "uid": "0f0e0d0c-0b0a-0908-0706-050403020100"},
        "spec": {"model": {"source": "/models/qwen2.5-0.5b"}, "dataset": {"train": {"source": "/data/train.jsonl"}},
                 "output": {"destination": "pvc://models/sft-00042"}, "resources": {"gpusPerNode": 1},
                 "runPolicy": {"backoffLimit": 0}}})
    config_map, *_, job = render_children(sftjob)
    job = prepare_job(job)
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": "sft-00042", "uid": "a" * 36, "controller": True,
             "blockOwnerDeletion": True}
    managed = [{"manager": m, "operation": "Update", "apiVersion": "v1", "time": STAMP, "fieldsType": "FieldsV1",
                "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:sft.dev/job-name": {}}}, "f:status": {}}}
               for m in ("kube-controller-manager", "kwok")]
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {**job["spec"]["template"]["metadata"], "name": "sft-00042-0-x7k2p", "namespace": "opbench-op",
                        "uid": "b" * 36, "resourceVersion": "123456", "creationTimestamp": STAMP,
                        "ownerReferences": [owner], "managedFields": managed},
           "spec": {**job["spec"]["template"]["spec"], "nodeName": "kwok-gpu-7", "dnsPolicy": "ClusterFirst"},
           "status": {"phase": "Running", "podIP": "10.0.0.7", "startTime": STAMP,
                      "conditions": [{"type": t, "status": "True", "lastTransitionTime": STAMP}
                                     for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")],
                      "containerStatuses": [{"name": "trainer", "image": job["spec"]["template"]["spec"]["containers"][0]["image"],
                                             "ready": True, "restartCount": 0,
                                             "state": {"running": {"startedAt": STAMP}}}]}}
    meta = {"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
            "metadata": {**config_map["metadata"], "uid": "c" * 36, "resourceVersion": "123400", "creationTimestamp": STAMP,
                         "managedFields": managed[:1]}}
    return {"pod watch event": {"type": "MODIFIED", "object": pod}, "Job (create answer)": job,
            "ConfigMap whole": {"type": "ADDED", "object": {**config_map, "metadata": meta["metadata"]}},
            "ConfigMap by metadata": {"type": "ADDED", "object": meta}}


def best(fn: Callable[[], Any], rounds: int, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.process_time()
        for _ in range(rounds):
            fn()
        times.append((time.process_time() - start) / rounds)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    print("| object | bytes | decode: json | decode: orjson | encode: json | encode: orjson |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, obj in samples().items():
        raw = json.dumps(obj).encode()
        assert orjson.loads(raw) == json.loads(raw)
        cells = [best(lambda: json.loads(raw), args.rounds, args.repeat), best(lambda: orjson.loads(raw), args.rounds, args.repeat),
                 best(lambda: json.dumps(obj).encode(), args.rounds, args.repeat),
                 best(lambda: orjson.dumps(obj), args.rounds, args.repeat)]
        print(f"| {name} | {len(raw):,} | " + " | ".join(f"{c * 1e6:.1f} µs" for c in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
