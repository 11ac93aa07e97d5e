"""What the benchmark's own watches saw: first-seen times of each SFTJob's children, pods and status
phases, and a wave's latencies from them."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from sft_operator.api import GROUP, PLURAL, VERSION
from sft_operator.core.render import LABEL_JOB

from .api import Api

PHASES_RUNNING_OR_LATER = ("Running", "Succeeded", "Failed")


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
