#!/usr/bin/env python
"""Which Kubernetes client for the operator: the same N ConfigMap creates, 16 in flight, three ways.

  threads   the kubernetes client (sync) in asyncio.to_thread, what the operator used before
  aiohttp   raw aiohttp, JSON in and out (what sft_operator.runtime.client does)
  kasync    kubernetes_asyncio, when importable (e.g. `pip install --target DIR kubernetes_asyncio`
            and --kubernetes-asyncio DIR; it is not a dependency of the project)

One throw-away dev cluster; the clients take turns (--rounds), each in a fresh subprocess so that
imports and memory are its own. Prints wall time, the client process's CPU time per create and its
RSS growth (imports included). CPU per create is the point: the API server is shared.

    python bench/kube_client.py --creates 600 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "contract"), str(ROOT / "operator"), str(ROOT / "trainer_image"), str(ROOT / "tools")]

import sft_devcluster as devcluster  # noqa: E402

CLIENT = r'''
import asyncio, base64, json, os, ssl, sys, time, yaml, psutil
kind, ns, n, conc = sys.argv[1], sys.argv[2], int(sys.argv[3]), 16
kubeconfig = os.environ["KUBECONFIG"]
data = {"config.json": json.dumps({"x": "y" * 1500})}
body = lambda i: {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"cm-{i}", "namespace": ns}, "data": data}
rss0 = psutil.Process().memory_info().rss

async def threads():
    from kubernetes import client, config
    core = client.CoreV1Api(config.new_client_from_config(config_file=kubeconfig))
    sem = asyncio.Semaphore(conc)
    async def one(i):
        async with sem:
            r = await asyncio.to_thread(core.create_namespaced_config_map, ns, body(i), _preload_content=False)
            json.loads(r.data)
    await asyncio.gather(*(one(i) for i in range(n)))

async def raw_aiohttp():
    import aiohttp
    from sft_operator.runtime.client import KubeClient
    kube = KubeClient.from_kubeconfig(kubeconfig, slots=conc)
    try:
        await asyncio.gather(*(kube.create(body(i)) for i in range(n)))
    finally:
        await kube.close()

async def kasync():
    from kubernetes_asyncio import client, config
    api = await config.new_client_from_config(config_file=kubeconfig)
    core = client.CoreV1Api(api)
    sem = asyncio.Semaphore(conc)
    async def one(i):
        async with sem:
            r = await core.create_namespaced_config_map(ns, body(i), _preload_content=False)
            json.loads(await r.read())
    await asyncio.gather(*(one(i) for i in range(n)))
    await api.close()

fn = {"threads": threads, "aiohttp": raw_aiohttp, "kasync": kasync}[kind]
c0, t0 = time.process_time(), time.monotonic()
asyncio.run(fn())
print(json.dumps({"wall": time.monotonic() - t0, "cpu": time.process_time() - c0,
                  "rss": (psutil.Process().memory_info().rss - rss0) / 2**20}))
'''


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--creates", type=int, default=600)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--kubernetes-asyncio", type=Path, default=None, metavar="DIR",
                   help="a directory where kubernetes_asyncio is installed (pip install --target DIR ...)")
    args = p.parse_args()
    devcluster.ensure_binaries()
    work = Path(tempfile.mkdtemp(prefix="sft-kubeclient-"))
    info = devcluster.up(work / "cluster", gpu_nodes=1, stop_with_pid=os.getpid())
    kubectl = [str(Path(info.bin_dir) / "kubectl"), f"--kubeconfig={info.kubeconfig}"]
    (work / "client.py").write_text(CLIENT)
    kinds = ["threads", "aiohttp"] + (["kasync"] if args.kubernetes_asyncio else [])
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    try:
        for r in range(args.rounds):
            for kind in kinds:
                ns = f"kc-{kind}-{r}"
                subprocess.run([*kubectl, "create", "ns", ns], check=True, capture_output=True)
                env = {**os.environ, "KUBECONFIG": info.kubeconfig,
                       "PYTHONPATH": os.pathsep.join([str(ROOT / "contract"), str(ROOT / "operator"), str(ROOT / "trainer_image")]
                                                     + ([str(args.kubernetes_asyncio)] if kind == "kasync" else []))}
                out = subprocess.run([sys.executable, str(work / "client.py"), kind, ns, str(args.creates)],
                                     capture_output=True, text=True, env=env, check=True)
                results[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
                subprocess.run([*kubectl, "delete", "ns", ns, "--wait=false"], capture_output=True)
    finally:
        devcluster.down(work / "cluster")
    print(f"{args.creates} ConfigMap creates, 16 in flight, {args.rounds} round(s), {os.cpu_count()} cores\n")
    print("| client | wall (mean) | client CPU per create | RSS growth |")
    print("|---|---:|---:|---:|")
    for kind, runs in results.items():
        wall = sum(x["wall"] for x in runs) / len(runs)
        cpu = sum(x["cpu"] for x in runs) / len(runs) / args.creates * 1000
        rss = sum(x["rss"] for x in runs) / len(runs)
        print(f"| {kind} | {wall:.2f} s | {cpu:.2f} ms | {rss:.0f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
