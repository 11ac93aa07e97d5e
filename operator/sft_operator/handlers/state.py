"""The operator's in-memory view of SFTJobs, their Jobs and pods, fed by the watches.

Status is derived from this view (never from a fresh LIST per event), so a pod event costs one
pure computation and, only when something changed, one status patch.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..status import Cause
from .kube import CallGate

Key = tuple[str, str]  # (namespace, SFTJob name)

_KEEP = {
    "SFTJob": ("apiVersion", "kind", "metadata", "spec", "status"),
    "Job": ("apiVersion", "kind", "metadata", "spec", "status"),
    "Pod": ("metadata", "status"),
}
_JOB_SPEC_KEEP = ("suspend", "completions", "parallelism", "activeDeadlineSeconds", "backoffLimit")
_META_KEEP = (
    "name", "namespace", "uid", "generation", "creationTimestamp", "deletionTimestamp",
    "labels", "annotations", "ownerReferences", "resourceVersion",
)


def _plain(value: Any) -> Any:
    """A deep copy of decoded JSON (dicts, lists, scalars): much cheaper than copy.deepcopy."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def slim(kind: str, body: Any) -> dict[str, Any]:
    """A plain-dict copy of the parts status derivation reads (pod specs and Job templates are big).

    Trims first and copies only what is kept: managedFields and the Job's pod template are never copied.
    """
    out: dict[str, Any] = {}
    for key in _KEEP[kind]:
        if key not in body:
            continue
        value = body[key]
        if key == "metadata":
            value = {k: value[k] for k in _META_KEEP if k in value} if value else {}
        elif key == "spec" and kind == "Job":
            value = {k: value[k] for k in _JOB_SPEC_KEEP if k in value} if value else {}
        out[key] = _plain(value)
    out.setdefault("metadata", {})
    if kind == "Job":
        out.setdefault("spec", {})
    return out


@dataclass
class ClusterState:
    sftjobs: dict[Key, dict[str, Any]] = field(default_factory=dict)
    jobs: dict[Key, dict[str, Any]] = field(default_factory=dict)
    pods: dict[Key, dict[str, dict[str, Any]]] = field(default_factory=dict)  # key -> pod uid -> pod
    # The operator-owned status we last wrote, by key: (SFTJob uid, status). Newer than the watch.
    written: dict[Key, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    creation_errors: dict[Key, Cause] = field(default_factory=dict)
    pod_creation_errors: dict[Key, Cause] = field(default_factory=dict)  # the Job's FailedCreate events
    pod_checks: dict[Key, asyncio.TimerHandle] = field(default_factory=dict)
    effective_batch: dict[tuple[str, int], int] = field(default_factory=dict)  # (uid, generation) -> size
    locks: dict[Key, asyncio.Lock] = field(default_factory=dict)
    timers: dict[Key, asyncio.TimerHandle] = field(default_factory=dict)
    ttl_tasks: dict[Key, asyncio.Task] = field(default_factory=dict)
    tasks: set[asyncio.Task] = field(default_factory=set)
    gate: CallGate = field(default_factory=CallGate)  # blocking API calls: status patches first
    # Phase per tracked SFTJob and how many are in each, kept by track_phase() (O(1) per change).
    phases: dict[Key, str] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)

    def lock(self, key: Key) -> asyncio.Lock:
        lock = self.locks.get(key)
        if lock is None:
            lock = self.locks[key] = asyncio.Lock()
        return lock

    def put_pod(self, key: Key, pod: dict[str, Any]) -> None:
        self.pods.setdefault(key, {})[pod["metadata"]["uid"]] = pod

    def drop_pod(self, key: Key, uid: str) -> None:
        pods = self.pods.get(key)
        if pods is not None:
            pods.pop(uid, None)
            if not pods:
                del self.pods[key]

    def pods_of(self, key: Key, job_uid: str | None) -> list[dict[str, Any]]:
        """Pods of this key's Job (pods of an earlier Job of the same name are ignored)."""
        pods = list((self.pods.get(key) or {}).values())
        if job_uid is None:
            return pods
        return [p for p in pods if any(r.get("uid") == job_uid for r in p["metadata"].get("ownerReferences") or [])]

    def current_status(self, key: Key) -> dict[str, Any]:
        """The SFTJob's status as the watch saw it, overlaid with what we wrote since."""
        sftjob = self.sftjobs.get(key) or {}
        status = dict(sftjob.get("status") or {})
        written = self.written.get(key)
        if written and written[0] == (sftjob.get("metadata") or {}).get("uid"):
            status.update(written[1])
        return status

    def track_phase(self, key: Key) -> None:
        """Update the phase counts for one SFTJob after its body or our write of its status changed."""
        old = self.phases.pop(key, None)
        if old is not None:
            self.counts[old] -= 1
        if key in self.sftjobs:
            phase = self.phases[key] = self.current_status(key).get("phase") or "Pending"
            self.counts[phase] += 1

    def phase_counts(self) -> dict[str, int]:
        if len(self.phases) != len(self.sftjobs):  # written to directly (tests, a missed call): recount
            self.phases.clear()
            self.counts.clear()
            for key in self.sftjobs:
                self.track_phase(key)
        return {phase: n for phase, n in self.counts.items() if n > 0}

    def forget(self, key: Key) -> None:
        for table in (self.sftjobs, self.written, self.creation_errors, self.pod_creation_errors, self.locks):
            table.pop(key, None)
        self.track_phase(key)
        for timers in (self.timers, self.pod_checks):
            timer = timers.pop(key, None)
            if timer:
                timer.cancel()
        task = self.ttl_tasks.pop(key, None)
        if task:
            task.cancel()

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task
