#!/usr/bin/env python
"""Real-node timings of the dev cluster, measured side by side in one run.

  (a) `up` without the real node (kwok nodes only, all on loopback) and its `down`
  (b) `up` with the real node sft-node-0 (containerd, kubelet, kube-proxy, CoreDNS), the part
      of it from the kubelet's start to the node being Ready and untainted, and its `down`
      (which also removes what the node changed on the host)
  (c) pod create -> Succeeded on the real node: a Pod Security "restricted" busybox pod that
      prints a line, --pods times one after the other (p50 / max), and `kubectl logs` of it
  (d) SFTJob apply -> Running and apply -> Succeeded on the real node: the chart installed
      (`helm install --wait`, the operator image), examples/dev-cluster-tiny.yaml applied
      --sftjobs times one after the other (the tiny model, 3 epochs in the trainer image)

Each `up` starts from nothing in a temp state dir; the node's images were imported once
before (containerd's image store is kept in ~/.cache/sft-operator/node), as in daily use.
Needs root, the binaries of scripts/k8s-bin.sh and scripts/node-bin.sh, and the images of
scripts/build-images.sh (built or reused first).

    python bench/real_node.py             # about three minutes
    python bench/real_node.py --pods 10 --sftjobs 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tools"), str(ROOT / "contract"), str(ROOT / "operator"), str(ROOT / "trainer_image")]

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
    image = realnode.archive_reference(devcluster.state.node_cache_dir() / "images" / "busybox.tar")
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


def built_images() -> list[Path]:
    """The image tars of scripts/build-images.sh (built or reused), in its `<ref> <tar>` lines."""
    out = subprocess.run(["bash", str(ROOT / "scripts" / "build-images.sh"), "all"], stdout=subprocess.PIPE,
                         text=True, check=True).stdout
    return [Path(line.split()[1]) for line in out.strip().splitlines()[-2:]]


def sftjob_round_trips(info, count: int) -> list[tuple[float, float]]:
    """(apply -> Running, apply -> Succeeded) of the README's tiny SFTJob, ``count`` in a row."""
    from kubernetes import client, config

    from sft_trainer import tiny

    kubectl = [str(Path(info.bin_dir) / "kubectl"), f"--kubeconfig={info.kubeconfig}"]
    tiny.generate(devcluster.node_objects.volume_path(Path(info.state_dir), "default", "datasets") / "tiny")
    subprocess.run(kubectl + ["create", "namespace", "sft-system"], check=True, capture_output=True)
    subprocess.run(kubectl + ["label", "namespace", "sft-system", "pod-security.kubernetes.io/enforce=restricted"],
                   check=True, capture_output=True)
    subprocess.run([str(Path(info.bin_dir) / "helm"), f"--kubeconfig={info.kubeconfig}", "install", "sft-operator",
                    str(ROOT / "helm" / "sft-operator"), "-n", "sft-system", "--wait", "--timeout", "180s"],
                   check=True, capture_output=True)
    api = config.new_client_from_config(config_file=info.kubeconfig)
    custom = client.CustomObjectsApi(api)
    example = yaml.safe_load((ROOT / "examples" / "dev-cluster-tiny.yaml").read_text())
    times = []
    for i in range(count):
        manifest = {**example, "metadata": {"name": f"tiny-{i}"}}
        manifest["spec"] = {**example["spec"], "output": {"destination": f"pvc://models/tiny-{i}"}}
        start = time.monotonic()
        subprocess.run(kubectl + ["apply", "-f", "-"], input=yaml.safe_dump(manifest), text=True, check=True,
                       capture_output=True)
        running = None
        while True:
            phase = (custom.get_namespaced_custom_object("sft.dev", "v1alpha1", "default", "sftjobs", f"tiny-{i}")
                     .get("status") or {}).get("phase")
            if phase == "Running" and running is None:
                running = time.monotonic() - start
            if phase in ("Succeeded", "Failed"):
                assert phase == "Succeeded", f"tiny-{i} {phase}"
                times.append((running, time.monotonic() - start))
                break
            time.sleep(0.1)
    api.close()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=5)
    parser.add_argument("--sftjobs", type=int, default=3)
    args = parser.parse_args()
    devcluster.ensure_binaries()
    devcluster.ensure_node_binaries()
    archives = built_images()
    with tempfile.TemporaryDirectory(prefix="bench-node-") as tmp:
        kwok_dir, node_dir = Path(tmp, "kwok"), Path(tmp, "node")
        kwok_info, kwok_up = timed(devcluster.up, kwok_dir, gpu_nodes=2)
        _, kwok_down = timed(devcluster.down, kwok_dir)
        node_info, node_up = timed(devcluster.up, node_dir, gpu_nodes=2, real_node=True, timeout=180)
        try:
            # What `sftctl dev-cluster up` does next: minutes when the node lacks this build, ~1 s when it has it.
            imported, import_time = timed(devcluster.import_images, node_dir, archives)
            pods = pod_round_trips(node_info, args.pods)
            jobs = sftjob_round_trips(node_info, args.sftjobs)
        finally:
            _, node_down = timed(devcluster.down, node_dir)

    rows = [
        ("`up`, kwok nodes only (loopback)", f"{kwok_up:.1f} s"),
        ("`down`, kwok nodes only", f"{kwok_down:.1f} s"),
        ("`up` with the real node", f"{node_up:.1f} s ({node_up / kwok_up:.1f}x)"),
        ("of which kubelet start -> node Ready", f"{node_info.node_ready_seconds:.1f} s"),
        ("then importing the product images (" + ", ".join(sorted({a for _, a in imported})) + ")",
         f"{import_time:.1f} s"),
        ("`down` with the real node (host cleanup included)", f"{node_down:.1f} s"),
        (f"restricted pod create -> Succeeded, {len(pods)} in a row, p50 / max",
         f"{statistics.median(pods):.2f} / {max(pods):.2f} s"),
        (f"tiny SFTJob apply -> Running, {len(jobs)} in a row, p50 / max",
         f"{statistics.median(r for r, _ in jobs):.1f} / {max(r for r, _ in jobs):.1f} s"),
        (f"tiny SFTJob apply -> Succeeded (examples/dev-cluster-tiny.yaml), {len(jobs)} in a row, p50 / max",
         f"{statistics.median(d for _, d in jobs):.1f} / {max(d for _, d in jobs):.1f} s"),
    ]
    print("| measurement | time |\n|---|---:|")
    for what, value in rows:
        print(f"| {what} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
