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
import base64
import json
import math
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "contract"), str(ROOT / "operator"), str(ROOT / "trainer_image"), str(ROOT / "tools")]

import aiohttp
import psutil
import yaml
import sft_devcluster as devcluster
from sft_devcluster.kwok import kwok_claim
from sft_devcluster.operator_process import OperatorProcess
from sft_operator.api import GROUP, PLURAL, VERSION
from sft_operator.core.decisions import prepare_job
from sft_operator.core.render import LABEL_JOB, render_children

SECTION = "## Operator: SFTJobs at scale"
NS_BARE, NS_WARM, NS_OP, NS_BARE2 = "opbench-bare", "opbench-warm", "opbench-op", "opbench-bare-again"
GPUS_PER_NODE = 8  # the dev cluster's kwok nodes
PHASES_RUNNING_OR_LATER = ("Running", "Succeeded", "Failed")


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


# ---------------------------------------------------------------------------- small helpers


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def fmt_s(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f} s"


def fmt_mib(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 2**20:.1f} MiB"


OUTPUT_CLAIM = "models"  # one per namespace, bound by kwok's volume stage


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


def path_for(obj: dict[str, Any]) -> str:
    ns = obj["metadata"]["namespace"]
    kind = obj["kind"]
    if kind == "ConfigMap":
        return f"/api/v1/namespaces/{ns}/configmaps"
    if kind == "Service":
        return f"/api/v1/namespaces/{ns}/services"
    if kind == "Job":
        return f"/apis/batch/v1/namespaces/{ns}/jobs"
    if kind == "PersistentVolumeClaim":
        return f"/api/v1/namespaces/{ns}/persistentvolumeclaims"
    if kind == "SFTJob":
        return f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}"
    raise ValueError(kind)


# ---------------------------------------------------------------------------- API access (aiohttp)


class Api:
    """A bare asyncio client on the admin kubeconfig (client certificate), JSON in and out."""

    def __init__(self, kubeconfig: Path, workdir: Path, concurrency: int) -> None:
        cfg = yaml.safe_load(kubeconfig.read_text())
        cluster = cfg["clusters"][0]["cluster"]
        user = cfg["users"][0]["user"]
        self.server = cluster["server"]
        files = {}
        for key, data in (("ca", cluster["certificate-authority-data"]), ("crt", user["client-certificate-data"]),
                          ("key", user["client-key-data"])):
            files[key] = workdir / f"bench-{key}.pem"
            files[key].write_bytes(base64.b64decode(data))
            files[key].chmod(0o600)
        self.ssl = ssl.create_default_context(cafile=str(files["ca"]))
        self.ssl.load_cert_chain(str(files["crt"]), str(files["key"]))
        self.concurrency = concurrency
        self.session: aiohttp.ClientSession | None = None
        self.watch_session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Api:  # noqa: PYI034
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.ssl, limit=self.concurrency + 4))
        self.watch_session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.ssl, limit=0))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.session and self.watch_session
        await self.session.close()
        await self.watch_session.close()

    async def request(self, method: str, path: str, body: Any = None, **params: str) -> tuple[int, Any]:
        assert self.session
        async with self.session.request(method, self.server + path, json=body, params=params or None) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text) if text else None
            except ValueError:
                return resp.status, text

    async def create(self, obj: dict[str, Any], tries: int = 6) -> dict[str, Any]:
        """POST; 409 AlreadyExists counts as created; 429/5xx/connection errors are retried."""
        delay = 0.2
        for attempt in range(tries):
            try:
                status, out = await self.request("POST", path_for(obj), obj)
            except aiohttp.ClientError as exc:
                status, out = 0, str(exc)
            if status in (200, 201, 202) or status == 409:
                return out if isinstance(out, dict) else {}
            if status not in (0, 429, 500, 502, 503, 504) or attempt == tries - 1:
                raise RuntimeError(f"create {obj['kind']} {obj['metadata']['name']}: HTTP {status}: {str(out)[:300]}")
            await asyncio.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    async def create_all(self, objs: list[dict[str, Any]]) -> tuple[float, float, list[dict[str, Any]]]:
        """Create every object with `concurrency` requests in flight; (start, end, created objects)."""
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(len(objs)):
            queue.put_nowait(i)
        out: list[dict[str, Any]] = [{} for _ in objs]

        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                out[i] = await self.create(objs[i])

        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        return start, time.monotonic(), out

    async def watch(self, path: str, on_event, **params: str) -> None:
        """Watch forever (cancel to stop), reconnecting from the last resourceVersion."""
        assert self.watch_session
        rv: str | None = None
        while True:
            query = {"watch": "1", "timeoutSeconds": "600", "allowWatchBookmarks": "true", **params}
            if rv:
                query["resourceVersion"] = rv
            try:
                timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=700)
                async with self.watch_session.get(self.server + path, params=query, timeout=timeout) as resp:
                    if resp.status != 200:
                        rv = None
                        await asyncio.sleep(0.5)
                        continue
                    buf = b""
                    async for chunk in resp.content.iter_any():
                        buf += chunk
                        while b"\n" in buf:
                            line, buf = buf.split(b"\n", 1)
                            if not line.strip():
                                continue
                            now = time.monotonic()
                            ev = json.loads(line)
                            obj = ev.get("object") or {}
                            if ev.get("type") == "ERROR":
                                rv = None  # 410 Gone: start over (first-seen times keep the earliest)
                                break
                            rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                            if ev.get("type") != "BOOKMARK":
                                on_event(ev["type"], obj, now)
            except asyncio.CancelledError:
                raise
            except (TimeoutError, aiohttp.ClientError, ValueError):
                await asyncio.sleep(0.5)

    async def text(self, path: str) -> str:
        assert self.session
        async with self.session.get(self.server + path) as resp:
            return await resp.text()

    async def save(self, path: str, out: Path) -> None:
        assert self.watch_session  # no slot of the request pool is held for the duration
        async with self.watch_session.get(self.server + path, timeout=aiohttp.ClientTimeout(total=None)) as resp:
            out.write_bytes(await resp.read())


def pprof_top(binary: Path, profile: Path, nodes: int = 30) -> str:
    """`go tool pprof -top` of a CPU profile, by cumulative time (what each call path costs in all)."""
    if not profile.exists() or profile.stat().st_size == 0:
        return "(no profile)"
    out = subprocess.run(["go", "tool", "pprof", "-top", "-cum", f"-nodecount={nodes}", str(binary), str(profile)],
                         capture_output=True, text=True, timeout=300)
    return out.stdout or out.stderr


# ---------------------------------------------------------------------------- what the watches saw


@dataclass
class Seen:
    """First-seen times (time.monotonic of the benchmark's own watch) per SFTJob name, one namespace."""

    cm: dict[str, float] = field(default_factory=dict)
    svc: dict[str, float] = field(default_factory=dict)
    job: dict[str, float] = field(default_factory=dict)
    job_complete: dict[str, float] = field(default_factory=dict)
    pod_created: dict[str, float] = field(default_factory=dict)
    pod_running: dict[str, float] = field(default_factory=dict)
    pod_succeeded: dict[str, float] = field(default_factory=dict)
    sft_written_states: Counter = field(default_factory=Counter)  # "phase/reason" of each status written
    sft_phase: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))
    sft_writes: Counter = field(default_factory=Counter)

    @staticmethod
    def _first(table: dict[str, float], name: str, t: float) -> None:
        if name not in table:
            table[name] = t

    def on_cm(self, typ: str, obj: dict, t: float) -> None:
        name = obj["metadata"]["name"]
        if typ != "DELETED" and name.endswith("-config"):
            self._first(self.cm, name[: -len("-config")], t)

    def on_svc(self, typ: str, obj: dict, t: float) -> None:
        if typ != "DELETED":
            self._first(self.svc, obj["metadata"]["name"], t)

    def on_job(self, typ: str, obj: dict, t: float) -> None:
        if typ == "DELETED":
            return
        name = obj["metadata"]["labels"][LABEL_JOB]
        self._first(self.job, name, t)
        conds = (obj.get("status") or {}).get("conditions") or []
        if any(c.get("type") == "Complete" and c.get("status") == "True" for c in conds):
            self._first(self.job_complete, name, t)

    def on_pod(self, typ: str, obj: dict, t: float) -> None:
        if typ == "DELETED":
            return
        name = obj["metadata"]["labels"][LABEL_JOB]
        self._first(self.pod_created, name, t)
        phase = (obj.get("status") or {}).get("phase")
        if phase in ("Running", "Succeeded"):
            self._first(self.pod_running, name, t)  # a pod seen Succeeded was Running before
        if phase == "Succeeded":
            self._first(self.pod_succeeded, name, t)

    def on_sftjob(self, typ: str, obj: dict, t: float) -> None:
        name = obj["metadata"]["name"]
        if typ == "MODIFIED":
            self.sft_writes[name] += 1
            status = obj.get("status") or {}
            self.sft_written_states[f"{status.get('phase')}/{status.get('reason')}"] += 1
        phase = (obj.get("status") or {}).get("phase")
        if phase:
            self._first(self.sft_phase[name], phase, t)

    def children_done(self, names: list[str]) -> bool:
        return all(n in self.cm and n in self.svc and n in self.job for n in names)

    def children_time(self, names: list[str]) -> float | None:
        ts = [max(self.cm[n], self.svc[n], self.job[n]) for n in names if n in self.cm and n in self.svc and n in self.job]
        return max(ts) if len(ts) == len(names) else None

    def phase_time(self, name: str, phases: tuple[str, ...]) -> float | None:
        ts = [t for p, t in self.sft_phase.get(name, {}).items() if p in phases]
        return min(ts) if ts else None

    def count_phase(self, names: list[str], phase: str) -> int:
        return sum(1 for n in names if phase in self.sft_phase.get(n, {}))


def start_watches(api: Api, ns: str, seen: Seen, with_sftjobs: bool = True) -> list[asyncio.Task]:
    sel = {"labelSelector": LABEL_JOB}
    specs = [
        (f"/api/v1/namespaces/{ns}/configmaps", seen.on_cm, sel),
        (f"/api/v1/namespaces/{ns}/services", seen.on_svc, sel),
        (f"/apis/batch/v1/namespaces/{ns}/jobs", seen.on_job, sel),
        (f"/api/v1/namespaces/{ns}/pods", seen.on_pod, sel),
    ]
    if with_sftjobs:
        specs.append((f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}", seen.on_sftjob, {}))
    return [asyncio.ensure_future(api.watch(path, cb, **params)) for path, cb, params in specs]


async def wait_until(pred, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(interval)
    return bool(pred())


# ---------------------------------------------------------------------------- process accounting


class Sampler(threading.Thread):
    """RSS of the operator every 0.25 s (peak and timeline)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.stop = threading.Event()

    def rss(self) -> int:
        return self.proc.memory_info().rss

    def run(self) -> None:
        while not self.stop.wait(0.25):
            try:
                self.peak = max(self.peak, self.rss())
            except psutil.Error:
                return


OTHER = "(everything else on the machine)"


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """user+system CPU seconds of each named process itself (not its children: the benchmark
    started the operator and the control plane), and of everything else on the machine."""
    out = {}
    for name, pid in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
            out[name] = t.user + t.system
        except psutil.Error:
            out[name] = 0.0
    sys_t = psutil.cpu_times()
    busy = sum(getattr(sys_t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))
    out[OTHER] = busy - sum(out.values())
    return out


REQ_RE = re.compile(r"^apiserver_request_total\{([^}]*)\}\s+([0-9.e+]+)$")
WATCH_EVENTS_RE = re.compile(r"^apiserver_watch_events_total\{([^}]*)\}\s+([0-9.e+]+)$")
INTERESTING = {"configmaps", "services", "jobs", "sftjobs", "events", "pods", "persistentvolumeclaims"}
WATCH_EVENTS = "watch events sent"  # the "verb" of the watch-event counter: events sent to all watchers


async def apiserver_requests(api: Api) -> Counter:
    """Cumulative API server requests by (verb, resource[/subresource]), reads included (a WATCH counts
    its connections, not what they carry), and the watch events sent to all watchers by resource."""
    out: Counter = Counter()
    try:
        text = await api.text("/metrics")
    except aiohttp.ClientError:
        return out
    for line in text.splitlines():
        m = REQ_RE.match(line) or WATCH_EVENTS_RE.match(line)
        if not m:
            continue
        labels = dict(kv.split("=", 1) for kv in re.findall(r'(\w+="[^"]*")', m.group(1)))
        labels = {k: v.strip('"') for k, v in labels.items()}
        if line.startswith("apiserver_watch_events_total"):
            res = labels.get("resource") or (labels.get("kind", "").lower() + "s")  # "kind" before Kubernetes 1.30
            if res in INTERESTING:
                out[(WATCH_EVENTS, res)] += float(m.group(2))
            continue
        res = labels.get("resource", "")
        if res not in INTERESTING:
            continue
        key = (labels.get("verb", ""), res + (f"/{labels['subresource']}" if labels.get("subresource") else ""))
        out[key] += float(m.group(2))
    return out


def diff(after: Counter, before: Counter) -> dict[tuple[str, str], int]:
    return {k: int(after[k] - before.get(k, 0)) for k in after if after[k] - before.get(k, 0) > 0}


# ---------------------------------------------------------------------------- the operator


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


def reconcile_stats(metrics_text: str) -> tuple[float | None, int | None]:
    """(sum, count) of the operator's reconcile-duration histogram."""
    total = count = None
    for line in metrics_text.splitlines():
        if line.startswith("#") or "reconcile" not in line:
            continue
        name, _, value = line.rpartition(" ")
        if name.endswith("_sum") and "duration" in name:
            total = (total or 0.0) + float(value)
        elif name.endswith("_count") and "duration" in name:
            count = (count or 0) + int(float(value))
    return total, count


# ---------------------------------------------------------------------------- the run


@dataclass
class Wave:
    """One operator wave: N SFTJobs applied at once in one namespace."""

    ns: str
    names: list[str]
    seen: Seen
    t0: float = 0.0
    applied: float | None = None
    children: float | None = None
    all_done: float | None = None
    requests: dict = field(default_factory=dict)
    cpu: dict = field(default_factory=dict)
    reconcile: tuple = (None, None)
    profile: str = ""
    life_requests: dict = field(default_factory=dict)  # first POST until every SFTJob Succeeded (+2 s)
    events: Counter = field(default_factory=Counter)

    def latencies(self) -> dict[str, list[float]]:
        s = self.seen
        run, done, pod_done, job_pod, pod_start = [], [], [], [], []
        for n in self.names:
            t_job_seen, t_pod_seen, t_pod_run = s.job.get(n), s.pod_created.get(n), s.pod_running.get(n)
            if t_job_seen is not None and t_pod_seen is not None:
                job_pod.append(t_pod_seen - t_job_seen)
            if t_pod_seen is not None and t_pod_run is not None:
                pod_start.append(t_pod_run - t_pod_seen)
            t_pod, t_sft = s.pod_running.get(n), s.phase_time(n, PHASES_RUNNING_OR_LATER)
            if t_pod is not None and t_sft is not None:
                run.append(t_sft - t_pod)
            t_job, t_succ = s.job_complete.get(n), s.phase_time(n, ("Succeeded",))
            if t_job is not None and t_succ is not None:
                done.append(t_succ - t_job)
            t_pod_done = s.pod_succeeded.get(n)
            if t_pod_done is not None and t_succ is not None:
                pod_done.append(t_succ - t_pod_done)
        return {"pod Running -> phase Running+": run, "Job Complete -> phase Succeeded": done,
                "pod Succeeded -> phase Succeeded": pod_done,
                "(the cluster) Job seen -> its pod seen": job_pod, "(the cluster) pod seen -> pod Running": pod_start}


async def ensure_namespace(api: Api, ns: str) -> None:
    status, out = await api.request("POST", "/api/v1/namespaces", {"metadata": {"name": ns}})
    if status not in (201, 409):
        raise RuntimeError(f"create namespace {ns}: HTTP {status}: {out}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status, _ = await api.request("GET", f"/api/v1/namespaces/{ns}/serviceaccounts/default")
        if status == 200:
            break
        await asyncio.sleep(0.2)
    else:
        raise RuntimeError(f"no default ServiceAccount in {ns} after 60 s")
    status, out = await api.request("POST", f"/api/v1/namespaces/{ns}/persistentvolumeclaims",
                                    kwok_claim(OUTPUT_CLAIM))
    if status not in (201, 409):
        raise RuntimeError(f"create claim {ns}/{OUTPUT_CLAIM}: HTTP {status}: {out}")


class Profiler:
    """py-spy record (raw collapsed stacks, GIL holder only, non-blocking) of one process."""

    def __init__(self, pid: int, out: Path) -> None:
        exe = os.environ.get("PY_SPY") or shutil.which("py-spy")
        if not exe:
            raise RuntimeError("--profile-operator needs py-spy on PATH (or $PY_SPY=/path/to/py-spy)")
        self.out = out
        self.proc = subprocess.Popen([exe, "record", "--pid", str(pid), "--format", "raw", "--rate", "50", "--gil",
                                      "--nonblocking", "--output", str(out)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return summarize_profile(self.out)


def summarize_profile(path: Path, top: int = 18) -> str:
    if not path.exists():
        return "(py-spy wrote no profile)"
    inclusive: Counter = Counter()
    leaf: Counter = Counter()  # self time by function
    leaf_mod: Counter = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        for f in set(frames):
            inclusive[f] += n
        leaf[frames[-1]] += n
        m = re.search(r"\(([^)]*)\)$", frames[-1])
        fname = m.group(1) if m else frames[-1]
        for mod in ("sft_operator", "kopf", "kubernetes", "urllib3", "aiohttp", "pydantic", "yaml", "json", "ssl",
                    "asyncio", "prometheus_client", "logging", "copy"):
            if f"/{mod}/" in fname or fname.startswith(f"{mod}/") or fname.endswith(f"{mod}.py")\
                    or f"/{mod}/" in "/" + fname:
                leaf_mod[mod] += n
                break
        else:
            leaf_mod["other"] += n
    if not total:
        return "(no samples)"
    lines = [f"py-spy, GIL-holding samples in the burst window: {total} at 50 Hz ({total / 50:.1f} s of CPU)", "",
             "| self time by package | share |", "|---|---:|"]
    for mod, n in leaf_mod.most_common():
        lines.append(f"| {mod} | {100 * n / total:.0f}% |")
    lines += ["", "| function (self) | share |", "|---|---:|"]
    lines += [f"| `{f.replace('|', '/')[:110]}` | {100 * n / total:.0f}% |" for f, n in leaf.most_common(top)]
    lines += ["", "| function (inclusive) | share |", "|---|---:|"]
    generic = ("asyncio/", "runpy", "threading.py", "concurrent/futures", "sft_operator/runtime/main.py", "<module>",
               "kopf/_core/reactor/running.py", "kopf/_core/reactor/queueing.py", "kopf/_cogs/aiokits/", "copy.py)",
               "json/decoder.py", "operator_wrapper.py", "kopf/_cogs/clients/watching.py")
    shown = 0
    for f, n in inclusive.most_common():
        if any(g in f for g in generic):
            continue
        lines.append(f"| `{f.replace('|', '/')[:110]}` | {100 * n / total:.0f}% |")
        shown += 1
        if shown >= top:
            break
    return "\n".join(lines)


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


# The operator's writes in a wave's life, from the API server's counters (verb, resource): children
# created and patched (nothing else creates or patches these in the benchmark's namespaces). Writes
# on the SFTJobs (status, and metadata for an operator that patches it) are counted exactly from the
# watch's MODIFIED events, and Events from the Events about SFTJobs.
CHILD_WRITES = (("POST", "configmaps"), ("POST", "services"), ("POST", "jobs"), ("PATCH", "configmaps"),
                ("PATCH", "services"), ("PATCH", "jobs"))


def writes_per_job(wave: Wave) -> dict[str, float]:
    n = len(wave.names)
    children = sum(wave.life_requests.get(k, 0) for k in CHILD_WRITES)
    status = sum(wave.seen.sft_writes.values())
    events = sum(wave.events.values())
    return {"children": children / n, "status": status / n, "events": events / n,
            "total": (children + status + events) / n, "status_max": max(wave.seen.sft_writes.values(), default=0)}


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


# ---------------------------------------------------------------------------- report


def summarize(r: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The printed / written report, and the key numbers."""
    args = r["args"]
    n, n_warm = args["jobs"], r["n_warm"]
    warm, burst, rss = r["warm"], r["burst"], r["rss"]
    bare = min(r["bare1"], r["bare2"], key=lambda b: b["seconds"])
    which = "first" if bare is r["bare1"] else "second"
    ratio = burst.children / bare["seconds"] if burst.children else None
    lines = []
    lines.append(f"{n} SFTJobs x {args['gpus_per_job']} GPU, {args['gpu_nodes']} kwok nodes x 8 GPUs, "
                 f"client concurrency {args['concurrency']}, {os.cpu_count()} CPU cores; cluster up in {r['startup']} s")
    lines.append("")
    lines.append("| | bare client | operator | ratio |")
    lines.append("|---|---:|---:|---:|")
    lines.append(f"| all {3 * n} children of {n} SFTJobs exist | {bare['seconds']:.2f} s | {fmt_s(burst.children)} "
                 f"| **{ratio:.2f}x** |" if ratio else
                 f"| all {3 * n} children of {n} SFTJobs exist | {bare['seconds']:.2f} s | incomplete | n/a |")
    lines.append(f"| children per second | {bare['objects'] / bare['seconds']:.0f} | "
                 f"{(3 * n / burst.children) if burst.children else 0:.0f} | |")
    lines.append(f"| (operator) {n} SFTJobs POSTed by the client | | {burst.applied:.2f} s | |")
    lines.append(f"| (bare client) pass before / after the operator | {r['bare1']['seconds']:.2f} s / "
                 f"{r['bare2']['seconds']:.2f} s | | the {which} (faster) is used |")
    lines.append(f"| every Job Complete / every SFTJob Succeeded | {fmt_s(bare['jobs_complete'])} | {fmt_s(burst.all_done)} | |")
    lines.append("")
    per = writes_per_job(burst)
    lags = burst.latencies()
    lag99 = max((pct(xs, .99) or 0.0) for what, xs in lags.items() if what.startswith(("pod Running", "Job Complete")))
    lines.append("| target (DESIGN.md, issue #12) | measured | goal |")
    lines.append("|---|---:|---:|")
    lines.append(f"| API writes per SFTJob over its life | {per['total']:.2f} (children {per['children']:.2f}, on the "
                 f"SFTJob {per['status']:.2f}, Events {per['events']:.2f}) | <= 6 (3 + 2 + 1) |")
    lines.append(f"| all children created, operator / bare client | {f'{ratio:.2f}x' if ratio else 'n/a'} | <= 2x |")
    lines.append(f"| status lag p99 (pod Running, Job Complete) | {fmt_s(lag99)} | <= 2 s |")
    lines.append(f"| operator RSS after the burst | {fmt_mib(rss['all'])} | <= 150 MiB |")
    lines.append("")
    lines.append("Status latency (the benchmark's own watch: pod/Job change seen -> SFTJob status.phase seen):")
    lines.append("")
    lines.append("| wave | transition | jobs | p50 | p90 | p99 | max |")
    lines.append("|---|---|---:|---:|---:|---:|---:|")
    for label, wave in ((f"warm-up {n_warm}", warm), (f"burst {n}", burst)):
        for what, xs in wave.latencies().items():
            lines.append(f"| {label} | {what} | {len(xs)} | {fmt_s(pct(xs, .5))} | {fmt_s(pct(xs, .9))} | "
                         f"{fmt_s(pct(xs, .99))} | "
                         f"{fmt_s(max(xs) if xs else None)} |")
    lines.append("")
    per_warm = (rss["warm"] - rss["idle"]) / n_warm
    per_burst = (rss["all"] - rss["warm"]) / n
    lines.append("Operator memory (RSS, sampled after each wave settled):")
    lines.append("")
    lines.append("| point | SFTJobs tracked | RSS | bytes per job on this step |")
    lines.append("|---|---:|---:|---:|")
    lines.append(f"| idle | 0 | {fmt_mib(rss['idle'])} | |")
    lines.append(f"| after the warm-up wave | {n_warm} | {fmt_mib(rss['warm'])} | {per_warm / 1024:.1f} KiB |")
    lines.append(f"| after the burst | {n_warm + n} | {fmt_mib(rss['all'])} | {per_burst / 1024:.1f} KiB |")
    lines.append(f"| peak during the run | | {fmt_mib(rss['peak'])} | |")
    lines.append("")
    lines.append("Where the time goes (burst window: first SFTJob POST until the last child was seen):")
    lines.append("")
    lines.append(f"| API server requests | bare client window ({which} pass) | operator burst window |")
    lines.append("|---|---:|---:|")
    keys = sorted(set(bare["requests"]) | set(burst.requests), key=lambda k: (k[0] == WATCH_EVENTS, k[1], k[0]))
    for k in keys:
        lines.append(f"| {k[0]} {k[1]} | {bare['requests'].get(k, 0)} | {burst.requests.get(k, 0)} |")
    lines.append("")
    lines.append(f"| CPU seconds | bare client window ({which} pass) | operator burst window |")
    lines.append("|---|---:|---:|")
    for k in sorted(set(bare["cpu"]) | set(burst.cpu)):
        lines.append(f"| {k} | {bare['cpu'].get(k, 0):.1f} | {burst.cpu.get(k, 0):.1f} |")
    lines.append("")
    rsum, rcount = burst.reconcile
    per = writes_per_job(burst)
    lines.append(f"API writes per SFTJob over its whole life (burst, first POST until all Succeeded): "
                 f"**{per['total']:.2f}** = children {per['children']:.2f} + writes on the SFTJob (status, "
                 f"metadata) {per['status']:.2f} (max {per['status_max']} for one job; states written: "
                 f"{', '.join(f'{k} {v}' for k, v in burst.seen.sft_written_states.most_common())}) + Events {per['events']:.2f} "
                 f"({', '.join(f'{r} {c}' for r, c in burst.events.most_common()) or 'none'}). "
                 + (f"Reconcile runs: {rcount}, mean {rsum / rcount * 1000:.1f} ms (both waves). " if rcount else "")
                 + f"Operator log: {r['operator_log_lines']} lines, {r['operator_log_warnings']} warnings/errors.")
    if burst.profile:
        lines += ["", "Operator CPU profile, burst window (`--profile-operator`):", "", burst.profile]
    keynums = {"ratio": ratio, "bare": bare["seconds"], "operator": burst.children,
               "lat": burst.latencies(), "per_warm": per_warm, "per_burst": per_burst, "writes": per}
    return "\n".join(lines), keynums


def heading(args: argparse.Namespace) -> str:
    extra = " (profiled)" if args.profile_operator else ""
    if args.operator_source:
        extra += f" (operator from {args.operator_source})"
    if args.operator_arg:
        extra += f" (operator {' '.join(args.operator_arg)})"
    return f"### {args.jobs} SFTJobs{extra}"


def write_section(path: Path, head: str, body: str, command: str) -> None:
    """Add or replace our block under `head` in our own section; nothing else in the file changes."""
    intro = (
        f"{SECTION}\n\n"
        "Measured by `bench/operator_scale.py` in one run on a throw-away dev cluster (etcd, kube-apiserver,\n"
        "kube-controller-manager, kube-scheduler, kwok GPU nodes), all on the same machine. The bare client\n"
        "is an aiohttp client POSTing the very children `render_children` gives (real ownerReferences) with\n"
        "the same concurrency the benchmark applies SFTJobs with; the operator is `python -m sft_operator`\n"
        "as a subprocess. Latencies are between the benchmark's own watch events. Ratios, not absolute times,\n"
        "are the point: on 2 cores the API server, etcd, the controllers and the operator share the CPU.\n"
    )
    block = f"{head}\n\n```bash\n{command}\n```\n\n{body.rstrip()}\n"
    text = path.read_text() if path.exists() else "# Benchmarks\n"  # re-read right before writing
    start = text.find(SECTION + "\n")
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + intro + "\n" + block
    else:
        nxt = re.search(r"^## ", text[start + len(SECTION):], re.MULTILINE)
        end = start + len(SECTION) + nxt.start() if nxt else len(text)
        ours = text[start:end]
        # Result blocks are "### <N> SFTJobs..."; any other text before the first one (notes,
        # findings written by hand) is kept as it is.
        blocks = {m.group(0).strip(): m for m in re.finditer(r"^### \d+ SFTJobs.*\n", ours, re.MULTILINE)}
        parts: dict[str, str] = {}
        ordered = sorted(blocks.items(), key=lambda kv: kv[1].start())
        for i, (k, m) in enumerate(ordered):
            stop = ordered[i + 1][1].start() if i + 1 < len(ordered) else len(ours)
            parts[k] = ours[m.start():stop].rstrip() + "\n"
        prefix = ours[: ordered[0][1].start()] if ordered else intro + "\n"
        parts[head] = block

        def order(h: str) -> tuple[int, str]:
            m = re.match(r"### (\d+)", h)
            return (int(m.group(1)) if m else 0, h)

        new = prefix.rstrip() + "\n\n" + "\n".join(parts[k] for k in sorted(parts, key=order))
        text = text[:start] + new.rstrip() + "\n" + ("\n" + text[end:].lstrip("\n") if end < len(text) else "")
    path.write_text(text)


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
