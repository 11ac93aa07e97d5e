#!/usr/bin/env python
"""What one write costs the API server: SFTJob create and status write against a ConfigMap create.

On 2 cores the API server is the bottleneck of a burst (bench/operator_scale.py), so what each of
the operator's writes costs it decides how close the operator gets to a bare client. This starts a
throw-away control plane (no nodes), installs the SFTJob CRD and variants of it under other groups,
and measures the kube-apiserver process's CPU seconds per request for:

  configmap create        the cheapest child, the yardstick
  sftjob create           the user's POST
  sftjob status write     the operator's write: a JSON patch testing the uid and adding the whole status
                          (what ``kube.replace_status`` sends), a realistic Running status

Variants of the CRD (same schema, group renamed) show where the cost of a status write goes:

  as-shipped              crds/sft.dev_sftjobs.yaml
  no-cel                  every x-kubernetes-validations rule removed
  no-transition-rules     only the rules that read oldSelf removed
  loose-status            the status schema replaced by x-kubernetes-preserve-unknown-fields

    python bench/apiserver_cost.py                # 300 of each, about 2 min on 2 cores
    python bench/apiserver_cost.py --count 600 --variants as-shipped
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "contract"), str(ROOT / "operator"), str(ROOT / "trainer_image"), str(ROOT / "tools"), str(ROOT / "bench")]

import yaml
import sft_devcluster as devcluster

from opscale.accounting import cpu_seconds
from opscale.api import Api, ensure_namespace

CRD_FILE = ROOT / "crds" / "sft.dev_sftjobs.yaml"
VARIANTS = ("as-shipped", "no-cel", "no-transition-rules", "loose-status")
NAMESPACE = "apicost"


def strip_rules(node: Any, only_transition: bool) -> Any:
    """The schema with x-kubernetes-validations removed (all, or only those reading oldSelf)."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "x-kubernetes-validations":
                kept = [r for r in value if only_transition and "oldSelf" not in r.get("rule", "")]
                if kept:
                    out[key] = kept
                continue
            out[key] = strip_rules(value, only_transition)
        return out
    if isinstance(node, list):
        return [strip_rules(v, only_transition) for v in node]
    return node


def variant_crd(base: dict[str, Any], variant: str) -> tuple[dict[str, Any], str]:
    crd = copy.deepcopy(base)
    group = base["spec"]["group"] if variant == "as-shipped" else f"{variant}.example.dev"
    crd["spec"]["group"] = group
    crd["metadata"] = {"name": f"{crd['spec']['names']['plural']}.{group}"}
    for version in crd["spec"]["versions"]:
        schema = version["schema"]["openAPIV3Schema"]
        if variant == "no-cel":
            version["schema"]["openAPIV3Schema"] = strip_rules(schema, only_transition=False)
        elif variant == "no-transition-rules":
            version["schema"]["openAPIV3Schema"] = strip_rules(schema, only_transition=True)
        elif variant == "loose-status":
            schema["properties"]["status"] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    return crd, group


def sftjob(group: str, version: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{group}/{version}", "kind": "SFTJob",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "model": {"source": "/models/qwen2.5-0.5b"},
            "dataset": {"train": {"source": "/data/train.jsonl"}},
            "output": {"destination": f"pvc://models/{name}"},
            "resources": {"gpusPerNode": 1},
            "runPolicy": {"backoffLimit": 0},
        },
    }


def running_status(i: int) -> dict[str, Any]:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    cond = lambda t, s, r: {"type": t, "status": s, "reason": r, "message": f"{r} ({i})",  # noqa: E731
                            "lastTransitionTime": now, "observedGeneration": 1}
    return {
        "phase": "Running", "reason": "Training", "message": "1 of 1 pods running", "observedGeneration": 1,
        "jobName": f"job-{i}", "effectiveBatchSize": 16, "startTime": now, "restarts": 0,
        "conditions": [cond("Created", "True", "ChildrenCreated"), cond("Running", "True", "PodsRunning"),
                       cond("Succeeded", "False", "Running")],
        "progress": {"percent": 12, "step": 5 + i % 7, "totalSteps": 40, "epoch": 0.1, "etaSeconds": 300,
                     "stage": "Training"},
        "metrics": {"trainLoss": 2.31, "learningRate": 0.0002, "tokensPerSecond": 1234.5},
    }


class CpuMeter:
    def __init__(self, pid: int) -> None:
        self.pid = pid

    def seconds(self) -> float:
        return cpu_seconds({"process": self.pid})["process"]


async def pooled(n: int, concurrency: int, one) -> None:
    queue = list(range(n))

    async def worker() -> None:
        while queue:
            await one(queue.pop())

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def measure(label: str, meter: CpuMeter, n: int, concurrency: int, one) -> dict[str, float]:
    await asyncio.sleep(1.0)  # let the previous step's watch fan-out and etcd settle
    cpu0, t0 = meter.seconds(), time.monotonic()
    await pooled(n, concurrency, one)
    await asyncio.sleep(0.5)
    cpu = meter.seconds() - cpu0
    wall = time.monotonic() - t0 - 0.5
    row = {"label": label, "ms_cpu": 1000 * cpu / n, "ms_wall": 1000 * wall / n}
    print(f"  {label:48s} {row['ms_cpu']:6.2f} ms API server CPU per request  ({row['ms_wall']:5.2f} ms wall)",
          flush=True)
    return row


async def expect(api: Api, method: str, path: str, body: Any = None, ok=(200, 201)) -> Any:
    if method == "PATCH":
        assert api.session
        async with api.session.patch(api.server + path, json=body,
                                     headers={"Content-Type": "application/json-patch+json"}) as resp:
            status, out = resp.status, await resp.json(content_type=None)
    else:
        status, out = await api.request(method, path, body)
    if status not in ok:
        raise RuntimeError(f"{method} {path}: HTTP {status}: {str(out)[:400]}")
    return out


async def run(args, info, workdir: Path) -> list[dict[str, float]]:
    meter = CpuMeter(info.pids["kube-apiserver"])
    base = yaml.safe_load(CRD_FILE.read_text())
    version = base["spec"]["versions"][0]["name"]
    plural = base["spec"]["names"]["plural"]
    rows = []
    async with Api(Path(info.kubeconfig), workdir, args.concurrency) as api:
        await ensure_namespace(api, NAMESPACE)
        print(f"{args.count} requests per step, {args.concurrency} in flight", flush=True)

        async def cm(i: int) -> None:
            await expect(api, "POST", f"/api/v1/namespaces/{NAMESPACE}/configmaps",
                         {"metadata": {"name": f"cm-{i}"}, "data": {"config.json": "x" * 2000}})
        rows.append(await measure("configmap create", meter, args.count, args.concurrency, cm))

        for variant in args.variants:
            crd, group = variant_crd(base, variant)
            if variant != "as-shipped":
                await expect(api, "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd, ok=(200, 201, 409))
            path = f"/apis/{group}/{version}/namespaces/{NAMESPACE}/{plural}"
            for _ in range(100):  # the new API is served a moment after the CRD is Established
                status, _ = await api.request("GET", path)
                if status == 200:
                    break
                await asyncio.sleep(0.2)
            print(f"{variant} ({group})", flush=True)

            async def create(i: int) -> None:
                await expect(api, "POST", path, sftjob(group, version, f"job-{i}"))
            rows.append(await measure(f"{variant}: sftjob create", meter, args.count, args.concurrency, create))
            uids = {}
            items = (await expect(api, "GET", path))["items"]
            for item in items:
                uids[item["metadata"]["name"]] = item["metadata"]["uid"]

            def status_write(round_: int):
                async def one(i: int) -> None:
                    name = f"job-{i}"
                    st = running_status(i + round_)
                    await expect(api, "PATCH", f"{path}/{name}/status",
                                 [{"op": "test", "path": "/metadata/uid", "value": uids[name]},
                                  {"op": "add", "path": "/status", "value": st}])
                return one
            rows.append(await measure(f"{variant}: first status write", meter, args.count, args.concurrency, status_write(0)))
            rows.append(await measure(f"{variant}: next status write", meter, args.count, args.concurrency, status_write(1)))
            await expect(api, "DELETE", path)  # the collection, so the next variant starts alike
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--count", type=int, default=300, help="requests per step (default 300)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = parser.parse_args(argv)
    devcluster.ensure_binaries()
    workdir = Path(tempfile.mkdtemp(prefix="sft-apicost-"))
    info = devcluster.up(workdir / "cluster", gpu_nodes=0, timeout=300, stop_with_pid=os.getpid())
    try:
        asyncio.run(run(args, info, workdir))
    finally:
        devcluster.down(workdir / "cluster")
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
