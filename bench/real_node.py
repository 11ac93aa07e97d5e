#!/usr/bin/env python
"""Real-node timings of the dev cluster, measured side by side in one run.

  (a) `up` without the real node (kwok nodes + process node, all on loopback) and its `down`
  (b) `up` with the real node sft-node-0 (containerd, kubelet, kube-proxy, CoreDNS), the part
      of it from the kubelet's start to the node being Ready and untainted, and its `down`
      (which also removes what the node changed on the host)
  (c) pod create -> Succeeded on the real node: a Pod Security "restricted" busybox pod that
      prints a line, --pods times one after the other (p50 / max), and `kubectl logs` of it

Each `up` starts from nothing in a temp state dir; the node's images were imported once
before (containerd's image store is kept in ~/.cache/sft-operator/node), as in daily use.
Needs root and the binaries of scripts/k8s-bin.sh and scripts/node-bin.sh.

    python bench/real_node.py             # about a minute
    python bench/real_node.py --pods 10
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tools"), str(ROOT / "operator")]

import sft_devcluster as devcluster  # noqa: E402
from sft_devcluster import node as realnode  # noqa: E402


def timed(fn, *args, **kwargs):
    start = time.monotonic()
    result = fn(*args, **kwargs)
    return result, time.monotonic() - start


def restricted_pod(name: str, image: str) -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {"runAsNonRoot": True, "runAsUser": 65534, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "main", "image": image, "imagePullPolicy": "Never", "command": ["echo", "hello"],
                            "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                                "capabilities": {"drop": ["ALL"]}}}],
        },
    }


def pod_round_trips(info, count: int) -> list[float]:
    from kubernetes import client, config, watch

    api = config.new_client_from_config(config_file=info.kubeconfig)
    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": "bench", "labels": {
        "pod-security.kubernetes.io/enforce": "restricted"}}})
    while True:
        try:
            core.read_namespaced_service_account("default", "bench")
            break
        except client.ApiException:
            time.sleep(0.2)
    image = realnode.archive_reference(devcluster.cluster.node_cache_dir() / "images" / "busybox.tar")
    durations = []
    for i in range(count):
        name = f"hello-{i}"
        start = time.monotonic()
        core.create_namespaced_pod("bench", restricted_pod(name, image))
        for event in watch.Watch().stream(core.list_namespaced_pod, "bench", field_selector=f"metadata.name={name}",
                                          timeout_seconds=120):
            if event["object"].status.phase in ("Succeeded", "Failed"):
                assert event["object"].status.phase == "Succeeded", event["object"].status
                break
        durations.append(time.monotonic() - start)
    logs = subprocess.run([str(Path(info.bin_dir) / "kubectl"), f"--kubeconfig={info.kubeconfig}", "logs",
                           "-n", "bench", f"hello-{count - 1}"], capture_output=True, text=True).stdout.strip()
    assert logs == "hello", logs
    api.close()
    return durations


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=5)
    args = parser.parse_args()
    devcluster.ensure_binaries()
    devcluster.ensure_node_binaries()
    with tempfile.TemporaryDirectory(prefix="bench-node-") as tmp:
        kwok_dir, node_dir = Path(tmp, "kwok"), Path(tmp, "node")
        kwok_info, kwok_up = timed(devcluster.up, kwok_dir, gpu_nodes=2)
        _, kwok_down = timed(devcluster.down, kwok_dir)
        node_info, node_up = timed(devcluster.up, node_dir, gpu_nodes=2, real_node=True, timeout=180)
        try:
            pods = pod_round_trips(node_info, args.pods)
        finally:
            _, node_down = timed(devcluster.down, node_dir)

    rows = [
        ("`up`, kwok + process node (loopback)", f"{kwok_up:.1f} s"),
        ("`down`, kwok + process node", f"{kwok_down:.1f} s"),
        ("`up` with the real node", f"{node_up:.1f} s ({node_up / kwok_up:.1f}x)"),
        ("of which kubelet start -> node Ready", f"{node_info.node_ready_seconds:.1f} s"),
        ("`down` with the real node (host cleanup included)", f"{node_down:.1f} s"),
        (f"restricted pod create -> Succeeded, {len(pods)} in a row, p50 / max",
         f"{statistics.median(pods):.2f} / {max(pods):.2f} s"),
    ]
    print("| measurement | time |\n|---|---:|")
    for what, value in rows:
        print(f"| {what} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
