#!/usr/bin/env python
"""Operator scale benchmark: N SFTJobs applied at once, the operator against a bare client.

One run, one throw-away dev cluster (its own temp state dir and free ports, kwok GPU nodes with
8 GPUs each), four measurements side by side:

  (a) bare client   the children of N SFTJobs (ConfigMap, Service, Job from render_children, the
                    exact objects the operator creates, ownerReferences to real SFTJobs that no
                    operator watches) POSTed by an asyncio/aiohttp client with --concurrency
                    requests in flight; time until all 3N creates returned
  (b) operator      `python -m sft_operator` (subprocess, the cluster's admin kubeconfig,
                    --progress-allow-plaintext, free ports) and N SFTJobs POSTed at once by the
                    same client; time from the first SFTJob create until a watch has seen all 3N
                    children; ratio b / a
  (c) status        per job, the time from the benchmark's own watch seeing the pod Running (and
                    the Job Complete) to it seeing the SFTJob's status.phase reflect it
                    (Running-or-later, Succeeded); p50 / p90 / p99 / max
  (d) memory        operator RSS at idle, after a warm-up wave of N/10 SFTJobs, after the N more;
                    bytes per job on each step (flat per job = both slopes alike, small)

  (e) writes        API writes per SFTJob over its whole life (first POST until every SFTJob
                    Succeeded): children created or patched (the API server's request counters),
                    status writes (watch MODIFIED events of the SFTJobs; the operator writes
                    nothing else on them) and Events about SFTJobs (only the operator posts those)

Also recorded, to explain the numbers: API server requests by verb and resource in each window
(reads included) and the watch events it sent (from its /metrics), CPU seconds of every component,
the states each status write carried, and how long the cluster itself takes (a Job to get its pod,
a pod to run). `--profile-apiserver 40` adds kube-apiserver's own CPU profile of the burst.

Order: bare client (namespace opbench-bare) -> operator start -> warm-up wave N/10 (opbench-warm)
-> the N burst (opbench-op) -> operator stop -> bare client again (opbench-bare-again); the ratio
uses the faster bare pass (on a shared machine one pass can be unlucky). Each phase waits until
every Job has completed (kwok completes Job pods at once) so that one phase's pods don't load the
next. Results are printed as a table and written to
BENCHMARKS.md under "## Operator: SFTJobs at scale" (only that section is touched).

    python bench/operator_scale.py --jobs 200     # quick: about 2 min on 2 cores
    python bench/operator_scale.py                # 1000 SFTJobs on 127 kwok nodes, ~10 min
    python bench/operator_scale.py --jobs 200 --profile-operator   # + where the operator's CPU goes (py-spy)
    python bench/operator_scale.py --profile-apiserver 40           # + where kube-apiserver's CPU goes (pprof)

The operator runs from this checkout (sft_devcluster.operator_process, the launcher the tests use),
or from another one with --operator-source, so a before/after pair is measured the same way:

    git worktree add /tmp/sft-before <commit>
    python bench/operator_scale.py --operator-source /tmp/sft-before --no-write   # before
    python bench/operator_scale.py                                                # after
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "contract"), str(ROOT / "operator"), str(ROOT / "trainer_image"), str(ROOT / "tools")]

import sft_devcluster as devcluster
from sft_devcluster.operator_process import OperatorProcess
from sft_operator.api import GROUP, VERSION
from sft_operator.core.decisions import prepare_job
from sft_operator.core.render import render_children

from opscale.accounting import Sampler, apiserver_requests, cpu_seconds, diff, reconcile_stats
from opscale.api import OUTPUT_CLAIM, Api, ensure_namespace
from opscale.profiles import Profiler, pprof_top
from opscale.report import SECTION, fmt_mib, fmt_s, heading, summarize, write_section
from opscale.watches import Seen, Wave, start_watches, wait_until

NS_BARE, NS_WARM, NS_OP, NS_BARE2 = "opbench-bare", "opbench-warm", "opbench-op", "opbench-bare-again"
GPUS_PER_NODE = 8  # the dev cluster's kwok nodes


def parse(argv=None) -> argparse.Namespace:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--jobs", type=int, default=1000, help="SFTJobs in the burst (default 1000; --jobs 200 is the quick mode)")
    p.add_argument("--gpus-per-job", type=int, default=1, help="nvidia.com/gpu per SFTJob (one pod each; default 1)")
    p.add_argument("--gpu-nodes", type=int, default=None,
                   help="kwok GPU nodes (8 GPUs each); default: enough for every pod of the burst at once, "
                        "ceil(jobs x gpus-per-job / 8) + 2")
    p.add_argument("--concurrency", type=int, default=16,
                   help="requests in flight for the bare client and for applying SFTJobs (default 16)")
    p.add_argument("--warmup-fraction", type=float, default=0.1, help="size of the warm-up wave as a fraction of --jobs")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds any one phase may wait for the cluster before it is reported incomplete (default 900)")
    p.add_argument("--settle", type=float, default=5.0, help="seconds to wait before each memory sample (default 5)")
    p.add_argument("--dir", type=Path, default=None, help="state dir for the cluster (default: a fresh temp dir)")
    p.add_argument("--keep-cluster", action="store_true",
                   help="leave the cluster, the operator log and the state dir in place at the end")
    p.add_argument("--benchmarks-md", type=Path, default=ROOT / "BENCHMARKS.md",
                   help="where to write the results section (default: the repo's BENCHMARKS.md)")
    p.add_argument("--no-write", action="store_true", help="print only; do not touch BENCHMARKS.md")
    p.add_argument("--operator-arg", action="append", default=[], metavar="ARG",
                   help="an extra command-line argument for the operator (repeat), e.g. --operator-arg=--api-concurrency=32")
    p.add_argument("--operator-source", type=Path, default=None, metavar="CHECKOUT",
                   help="run the operator from another checkout (e.g. `git worktree add /tmp/before <commit>`) to "
                        "measure it with this script; the bare client and the cluster stay this checkout's")
    p.add_argument("--profile-operator", action="store_true",
                   help="sample the operator with py-spy (on PATH or $PY_SPY) during the burst window and print where "
                        "its CPU goes (functions holding the GIL, inclusive)")
    p.add_argument("--profile-apiserver", type=float, default=0.0, metavar="SECONDS",
                   help="take a CPU profile of kube-apiserver (its /debug/pprof) for this many seconds from the start "
                        "of the burst and print its top functions (`go tool pprof -top`)")
    args = p.parse_args(argv)
    if args.gpu_nodes is None:
        args.gpu_nodes = math.ceil(args.jobs * args.gpus_per_job / GPUS_PER_NODE) + 2
    return args


def sftjob_doc(name: str, namespace: str, gpus: int) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "SFTJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            # Sources already in the image and the output on a claim: the three children of #12's targets (a hub
            # or s3:// source or output adds a fourth, the fetch stage's cache claim; a local output is refused).
            "model": {"source": "/models/qwen2.5-0.5b"},
            "dataset": {"train": {"source": "/data/train.jsonl"}},
            "output": {"destination": f"pvc://{OUTPUT_CLAIM}/{name}"},
            "resources": {"gpusPerNode": gpus},
            "runPolicy": {"backoffLimit": 0},
        },
    }


class Operator(OperatorProcess):
    """The operator under test: the launcher the integration tests use, watching the wave namespaces."""

    def __init__(self, kubeconfig: Path, namespaces: list[str], log_path: Path, source: Path | None = None,
                 extra: list[str] = ()) -> None:
        me = OperatorProcess.plaintext(kubeconfig, log_path, namespaces, *extra, source=source)
        super().__init__(kubeconfig, log_path, me.args, source=source)
        self.ports = me.ports
        self.start(wait=False)

    @property
    def cmd(self) -> list[str]:
        return self.command

    def wait_healthy(self, timeout: float = 60) -> None:
        try:
            super().wait_healthy(timeout)
        except AssertionError as exc:
            raise RuntimeError(str(exc)) from None


async def run_wave(api: Api, op: Operator, pids: dict[str, int], ns: str, n: int, args, label: str,
                   profile: Path | None = None) -> Wave:
    names = [f"sft-{i:05d}" for i in range(n)]
    wave = Wave(ns, names, Seen())
    tasks = start_watches(api, ns, wave.seen)
    await asyncio.sleep(1.0)  # watches connected
    docs = [sftjob_doc(name, ns, args.gpus_per_job) for name in names]
    req0, cpu0 = await apiserver_requests(api), cpu_seconds(pids)
    profiler = Profiler(op.proc.pid, profile) if profile else None
    apiserver_profile, pprof_file = None, Path(args.profile_dir) / "apiserver.pprof"
    if args.profile_apiserver and label == "operator":
        apiserver_profile = asyncio.create_task(
            api.save(f"/debug/pprof/profile?seconds={args.profile_apiserver:.0f}", pprof_file))
    print(f"[{label}] applying {n} SFTJobs in {ns} ...", flush=True)
    start, applied, _ = await api.create_all(docs)
    wave.t0, wave.applied = start, applied - start
    if await wait_until(lambda: wave.seen.children_done(names), args.timeout):
        wave.children = wave.seen.children_time(names) - start
    else:
        have = sum(1 for x in names if x in wave.seen.job)
        print(f"[{label}] TIMEOUT: only {have}/{n} Jobs were created", flush=True)
    req1, cpu1 = await apiserver_requests(api), cpu_seconds(pids)
    if profiler:
        wave.profile = await asyncio.to_thread(profiler.stop)
    if apiserver_profile is not None:
        await apiserver_profile
        top = await asyncio.to_thread(pprof_top, Path(args.bin_dir) / "kube-apiserver", pprof_file)
        print(f"[{label}] kube-apiserver CPU profile, the first {args.profile_apiserver:.0f} s of the burst:\n{top}", flush=True)
    wave.requests = diff(req1, req0)
    wave.cpu = {k: cpu1[k] - cpu0.get(k, 0.0) for k in cpu1}
    print(f"[{label}] children of {n} SFTJobs exist after {fmt_s(wave.children)}; waiting for Succeeded ...", flush=True)
    remaining = max(60.0, args.timeout - (time.monotonic() - start))
    if await wait_until(lambda: wave.seen.count_phase(names, "Succeeded") == n, remaining, 0.25):
        wave.all_done = max(wave.seen.sft_phase[x]["Succeeded"] for x in names) - start
    else:
        print(f"[{label}] TIMEOUT: {wave.seen.count_phase(names, 'Succeeded')}/{n} SFTJobs Succeeded", flush=True)
    wave.reconcile = reconcile_stats(op.metrics())
    wave.events = await settled_events(api, ns)  # the operator posts Events after its creates and status writes
    wave.life_requests = diff(await apiserver_requests(api), req0)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return wave


async def settled_events(api: Api, ns: str, quiet: float = 5.0, timeout: float = 120.0) -> Counter:
    """Events about SFTJobs once no new one came for ``quiet`` seconds: they wait in the operator's
    lowest-priority queue, so some are posted after every SFTJob has Succeeded."""
    events, last_change, deadline = await sftjob_events(api, ns), time.monotonic(), time.monotonic() + timeout
    while time.monotonic() - last_change < quiet and time.monotonic() < deadline:
        await asyncio.sleep(1.0)
        now = await sftjob_events(api, ns)
        if now != events:
            events, last_change = now, time.monotonic()
    return events


async def sftjob_events(api: Api, ns: str) -> Counter:
    """Events about SFTJobs in ``ns`` by reason (only the operator posts those)."""
    status, out = await api.request("GET", f"/api/v1/namespaces/{ns}/events",
                                    fieldSelector="involvedObject.kind=SFTJob")
    items = (out or {}).get("items", []) if status == 200 else []
    return Counter(e.get("reason", "") for e in items for _ in range(max(1, int(e.get("count") or 1))))


async def run_baseline(api: Api, pids: dict[str, int], n: int, args, ns: str) -> dict[str, Any]:
    names = [f"sft-{i:05d}" for i in range(n)]
    print(f"[bare] creating {n} SFTJobs in {ns} (not timed; no operator watches it) ...", flush=True)
    _, _, sftjobs = await api.create_all([sftjob_doc(name, ns, args.gpus_per_job) for name in names])
    children: list[dict[str, Any]] = []
    for obj in sftjobs:  # render with the real uid: the very objects the operator would create
        for child in render_children(obj):
            children.append(prepare_job(child) if child["kind"] == "Job" else child)
    seen = Seen()
    tasks = start_watches(api, ns, seen, with_sftjobs=False)
    await asyncio.sleep(1.0)
    req0, cpu0 = await apiserver_requests(api), cpu_seconds(pids)
    print(f"[bare] creating {len(children)} children with {args.concurrency} requests in flight ...", flush=True)
    start, end, _ = await api.create_all(children)
    req1, cpu1 = await apiserver_requests(api), cpu_seconds(pids)
    print(f"[bare] {len(children)} objects created in {end - start:.2f} s; waiting for the Jobs to complete ...",
          flush=True)
    done = await wait_until(lambda: len(seen.job_complete) == n, args.timeout, 0.25)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "seconds": end - start,
        "objects": len(children),
        "jobs_complete": (max(seen.job_complete.values()) - start) if done and seen.job_complete else None,
        "requests": diff(req1, req0),
        "cpu": {k: cpu1[k] - cpu0.get(k, 0.0) for k in cpu1},
    }


async def settle_rss(sampler: Sampler, seconds: float) -> int:
    await asyncio.sleep(seconds)
    return sampler.rss()


async def main_async(args, info, workdir: Path) -> dict[str, Any]:
    kubeconfig = Path(info.kubeconfig)
    pids = dict(info.pids)
    pids["benchmark"] = os.getpid()
    result: dict[str, Any] = {"args": vars(args).copy(), "startup": info.startup_seconds}
    args.profile_dir, args.bin_dir = str(workdir), info.bin_dir
    async with Api(kubeconfig, workdir, args.concurrency) as api:
        for ns in (NS_BARE, NS_WARM, NS_OP, NS_BARE2):
            await ensure_namespace(api, ns)

        # (a) the bare client, before the operator exists (and again at the end, see below)
        result["bare1"] = await run_baseline(api, pids, args.jobs, args, NS_BARE)

        # the operator, idle
        op = Operator(kubeconfig, [NS_WARM, NS_OP], workdir / "operator.log", args.operator_source, args.operator_arg)
        result["operator_cmd"] = " ".join(op.cmd[1:])
        try:
            op.wait_healthy()
            pids["operator"] = op.proc.pid
            sampler = Sampler(op.proc.pid)
            sampler.start()
            rss_idle = await settle_rss(sampler, args.settle)
            print(f"[operator] healthy; idle RSS {fmt_mib(rss_idle)}", flush=True)

            # warm-up wave: N/10
            n_warm = max(1, round(args.jobs * args.warmup_fraction))
            warm = await run_wave(api, op, pids, NS_WARM, n_warm, args, "warm-up")
            rss_warm = await settle_rss(sampler, args.settle)
            peak_warm = sampler.peak
            print(f"[warm-up] RSS after {n_warm} SFTJobs: {fmt_mib(rss_warm)}", flush=True)

            # (b)+(c): the burst
            burst = await run_wave(api, op, pids, NS_OP, args.jobs, args, "operator",
                                   workdir / "profile.txt" if args.profile_operator else None)
            rss_all = await settle_rss(sampler, args.settle)
            print(f"[operator] RSS after {n_warm + args.jobs} SFTJobs: {fmt_mib(rss_all)} (peak {fmt_mib(sampler.peak)})",
                  flush=True)
            sampler.stop.set()
            if op.proc.poll() is not None:
                raise RuntimeError(f"the operator died:\n{op.log_tail()}")
        finally:
            op.stop()
        # (a) again, the operator stopped: on a shared machine one pass can be unlucky. The ratio
        # is taken against the faster pass (the conservative choice for the operator).
        result["bare2"] = await run_baseline(api, pids, args.jobs, args, NS_BARE2)
        log_text = op.log_path.read_text(errors="replace") if op.log_path.exists() else ""
    result.update(
        warm=warm, burst=burst, n_warm=n_warm,
        rss={"idle": rss_idle, "warm": rss_warm, "all": rss_all, "peak_warm": peak_warm, "peak": sampler.peak},
        operator_log_lines=len(log_text.splitlines()),
        operator_log_warnings=sum(1 for line in log_text.splitlines() if "WARNING" in line or "ERROR" in line),
    )
    return result


def main(argv=None) -> int:
    args = parse(argv)
    command = "python bench/operator_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    command = command.strip()
    if args.profile_operator and not (os.environ.get("PY_SPY") or shutil.which("py-spy")):
        print("--profile-operator needs py-spy on PATH (or PY_SPY=/path/to/py-spy)", file=sys.stderr)
        return 2
    print("building or reusing the control-plane binaries ...", flush=True)
    devcluster.ensure_binaries()
    own_dir = args.dir is None
    workdir = Path(tempfile.mkdtemp(prefix="sft-opbench-")) if own_dir else args.dir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    state_dir = workdir / "cluster"
    print(f"starting a dev cluster in {state_dir} with {args.gpu_nodes} kwok GPU nodes ...", flush=True)
    # The SFTJob CRD of the operator under test: a newer CRD's defaults are fields an older operator refuses.
    crds = (args.operator_source / "crds") if args.operator_source else None
    info = devcluster.up(state_dir, gpu_nodes=args.gpu_nodes, timeout=300, crds_dir=crds,
                         stop_with_pid=None if args.keep_cluster else os.getpid(),
                         profiling=bool(args.profile_apiserver))
    print(f"cluster up in {info.startup_seconds} s: {info.server}", flush=True)
    try:
        result = asyncio.run(main_async(args, info, workdir))
    finally:
        if args.keep_cluster:
            print(f"kept: the cluster (KUBECONFIG={info.kubeconfig}), the operator log {workdir / 'operator.log'};"
                  f" stop it with `sftctl dev-cluster down --dir {state_dir}`")
        else:
            devcluster.down(state_dir)
            if own_dir:
                shutil.rmtree(workdir, ignore_errors=True)
    report, _ = summarize(result)
    print()
    print(report)
    print()
    print(f"operator: {result['operator_cmd']}")
    if not args.no_write:
        write_section(args.benchmarks_md, heading(args), report, command)
        print(f"written to {args.benchmarks_md} under '{SECTION}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
