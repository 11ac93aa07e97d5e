"""What the watches saw: SFTJobs and the children and pods labelled with their name (no I/O).

Status is derived from this cache, never from a fresh LIST per event, so a pod event costs one
pure computation and, only when something changed, one status write. Objects are kept slim:
only the fields that status derivation and reconciling read (a pod spec or a Job's pod template
is never kept; a ConfigMap is kept as a digest of its data).

A watch can miss a deletion (a 410 Gone relist reports only what exists); ``sweep`` drops what a
fresh list no longer shows, so a deleted job stops counting GPU-seconds and phase gauges.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from sft_operator.api import KIND
from sft_operator.api.types import TERMINAL_PHASES, Phase
from sft_operator.core.decisions import controller_of, data_digests
from sft_operator.core.render import LABEL_JOB, cache_claim_name, config_map_name, service_name, trainer_job_name
from sft_operator.core.status import Cause, is_ignored_failure

Key = tuple[str, str]  # (namespace, SFTJob name)
METADATA_ONLY = "PartialObjectMetadata"  # the kind of an object read by its metadata alone
CHILD_KINDS = ("ConfigMap", "Service", "PersistentVolumeClaim", "Job")  # the cache claim only when we create it
# Kueue's Workload of a queued Job: held beside the children (not ours: never created or deleted here).
QUEUE_KIND = "Workload"
DETAIL_KINDS = ("ConfigMap", "Service", "PersistentVolumeClaim", QUEUE_KIND)  # not read once the job is over (its Job is)
CHILD_NAMES = {"ConfigMap": config_map_name, "Service": service_name, "PersistentVolumeClaim": cache_claim_name,
               "Job": trainer_job_name}

_META = ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp", "ownerReferences", "resourceVersion")
_META_KEEP = {
    "SFTJob": (*_META, "generation"),
    "Job": (*_META, "labels", "annotations"),
    "Pod": (*_META, "labels", "annotations"),
    "ConfigMap": _META,
    "Service": _META,
    "PersistentVolumeClaim": _META,
    QUEUE_KIND: _META,
}
_JOB_SPEC_KEEP = ("suspend", "completions", "parallelism", "activeDeadlineSeconds", "backoffLimit")
_POD_CONDITIONS = ("PodScheduled", "DisruptionTarget")
_POD_STATUS_KEEP = ("phase", "reason", "message", "startTime")
_CONTAINER_STATUSES = ("initContainerStatuses", "containerStatuses")  # the fetch stage is an init container
_CONTAINER_STATUS_KEEP = ("name", "image", "state", "lastState")
_CONDITION_KEEP = ("type", "status", "reason", "message", "lastTransitionTime")


def _plain(value: Any) -> Any:
    """A deep copy of decoded JSON (dicts, lists, scalars): much cheaper than copy.deepcopy."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def slim(kind: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """A plain-dict copy of the parts this operator reads; trims before copying."""
    meta = body.get("metadata") or {}
    out: dict[str, Any] = {"metadata": {k: _plain(meta[k]) for k in _META_KEEP[kind] if k in meta}}
    if kind == "SFTJob":
        out.update(apiVersion=body.get("apiVersion"), kind=body.get("kind"),
                   spec=_plain(body.get("spec") or {}), status=_plain(body.get("status") or {}))
    elif kind == "Job":
        spec = body.get("spec") or {}
        out["spec"] = {k: _plain(spec[k]) for k in _JOB_SPEC_KEEP if k in spec}
        out["status"] = _plain(body.get("status") or {})
    elif kind == "Pod":
        status = body.get("status") or {}
        slimmed = {k: status[k] for k in _POD_STATUS_KEEP if k in status}
        slimmed["conditions"] = [_plain(c) for c in status.get("conditions") or [] if c.get("type") in _POD_CONDITIONS]
        for field_name in _CONTAINER_STATUSES:
            if status.get(field_name):
                slimmed[field_name] = [{k: _plain(c[k]) for k in _CONTAINER_STATUS_KEEP if k in c}
                                       for c in status[field_name]]
        slimmed.setdefault("containerStatuses", [])
        out["status"] = slimmed
        account = (body.get("spec") or {}).get("serviceAccountName")
        out["spec"] = {"serviceAccountName": account} if account else {}
    elif kind == QUEUE_KIND:
        conditions = (body.get("status") or {}).get("conditions") or []
        out["status"] = {"conditions": [{k: c[k] for k in _CONDITION_KEEP if k in c} for c in conditions]}
    elif kind == "ConfigMap":  # unknown (None) when only the metadata was read
        out["dataDigests"] = None if body.get("kind") == METADATA_ONLY else data_digests(body.get("data"))
    return out


def is_child(kind: str, body: Mapping[str, Any], job_name: str) -> bool:
    """Whether an object is a child the operator made for the SFTJob ``job_name``: the name the renderer gives
    that kind, controlled by an SFTJob of that name. The label alone says nothing: anyone can copy it (a
    TensorBoard Service copies the pods' selector into its labels). Which SFTJob (its uid) is checked where the
    child is read, since a child can be listed before its SFTJob."""
    ref = controller_of(body) or {}
    return ((body.get("metadata") or {}).get("name") == CHILD_NAMES[kind](job_name)
            and (ref.get("kind"), ref.get("name")) == (KIND, job_name))


def key_of(kind: str, body: Mapping[str, Any]) -> Key | None:
    """The SFTJob an object belongs to: itself, the one named by a pod's ``sft.dev/job-name`` label, or the
    one a child was made for (None for an object that only carries the label)."""
    meta = body.get("metadata") or {}
    if kind == "SFTJob":
        return (meta.get("namespace", ""), meta.get("name", ""))
    if kind == QUEUE_KIND:  # Kueue makes the Job it queues the Workload's controller; the Job has the SFTJob's name
        ref = controller_of(body) or {}
        if (ref.get("apiVersion"), ref.get("kind")) == ("batch/v1", "Job"):
            return (meta.get("namespace", ""), ref.get("name", ""))
        return None
    label = (meta.get("labels") or {}).get(LABEL_JOB)
    if not label or (kind in CHILD_NAMES and not is_child(kind, body, label)):
        return None
    return (meta.get("namespace", ""), label)


def controlled_by(obj: Mapping[str, Any] | None, uid: str | None) -> bool:
    ref = controller_of(obj)
    return bool(ref and uid and ref.get("uid") == uid)


def _newer_or_same(version: str | None, than: str | None) -> bool:
    """resourceVersion order: etcd's are integers; anything else counts as newer (the watch wins)."""
    try:
        return int(version or 0) >= int(than or 0)
    except ValueError:
        return True


class ManagedAs(NamedTuple):
    """What a reconcile was for: this SFTJob, this spec, these render options."""

    uid: Any
    generation: Any
    render_version: int


class Rendered(NamedTuple):
    """The last complete reconcile of an SFTJob."""

    managed_as: ManagedAs
    config_digest: str | None  # of the ConfigMap's rendered data
    kinds: tuple[str, ...]  # the children's kinds


class Written(NamedTuple):
    """Our last status write of an SFTJob, as the API server answered it."""

    uid: str
    resource_version: str
    status: dict[str, Any]


@dataclass
class Notes:
    """What the operator learned about one SFTJob outside the watched objects."""

    creation_error: Cause | None = None  # a child could not be created (quota, conflict, 422)
    pod_creation_error: Cause | None = None  # the Job's FailedCreate event (no pods)
    pod_problems: dict[str, Cause] = field(default_factory=dict)  # pod uid -> FailedMount, Multi-Attach (with since)
    # (pod uid, start problem kind) -> when the operator first saw it (status.track_start_clocks)
    start_clocks: dict[tuple[str, str], datetime] = field(default_factory=dict)
    rendered: Rendered | None = None
    finished: ManagedAs | None = None  # what the finished job's last reconcile was for
    # pod uid -> its Job's uid, for pods that failed without counting (disruption, exit 75): the Job
    # controller deletes them at once, maybe before a status write saw them, and status.restarts counts them
    replaced_pods: dict[str, str] = field(default_factory=dict)
    # A Succeeded job's result was read from rank 0's pod and is in status (or that pod had none): its pods
    # are no longer needed. Until then they are kept, however late their last update comes.
    result_read: bool = False

    def replaced_by(self, job_uid: str | None) -> set[str]:
        return {pod for pod, owner in self.replaced_pods.items() if owner == job_uid} if job_uid else set()


@dataclass
class Cache:
    sftjobs: dict[Key, dict[str, Any]] = field(default_factory=dict)
    children: dict[str, dict[Key, dict[str, Any]]] = field(
        default_factory=lambda: {k: {} for k in (*CHILD_KINDS, QUEUE_KIND)})
    pods: dict[Key, dict[str, dict[str, Any]]] = field(default_factory=dict)  # key -> pod uid -> pod
    # The status we last wrote, by key: (SFTJob uid, resourceVersion of our write, status). A watch event
    # older than our write would otherwise take the cache back in time.
    written: dict[Key, Written] = field(default_factory=dict)
    seen: dict[str, float] = field(default_factory=dict)  # uid -> when the watch last reported it
    notes: dict[Key, Notes] = field(default_factory=dict)
    phases: dict[Key, str] = field(default_factory=dict)  # phase per SFTJob, for the sft_jobs gauge
    counts: Counter = field(default_factory=Counter)

    # ---- feeding ----

    def put(self, kind: str, body: Mapping[str, Any]) -> Key | None:
        key = key_of(kind, body)
        if key is None:
            self._unseat(kind, body)
            return None
        if (kind == "Pod" and not self.reads_pods(key)) or (kind in DETAIL_KINDS and self.finished(key)):
            return key  # nothing reads them once the job is over (its Job is kept, to stop it)
        obj = slim(kind, body)
        uid = obj["metadata"].get("uid", "")
        self.seen[uid] = time.monotonic()
        if kind == "ConfigMap" and obj["dataDigests"] is None and not self._with_digests(key, obj):
            return key  # an older version than the one held
        if kind == "SFTJob":
            self.sftjobs[key] = obj
            written = self.written.get(key)
            if written and (written.uid != uid or _newer_or_same(obj["metadata"].get("resourceVersion"), written.resource_version)):
                del self.written[key]
            self._count_phase(key)
            if self.finished(key):
                self._drop_details(key)
        elif kind == "Pod":
            self.pods.setdefault(key, {})[uid] = obj
            self._remember_replaced(key, obj)
        else:
            self.children[kind][key] = obj
        return key

    def _with_digests(self, key: Key, obj: dict[str, Any]) -> bool:
        """A ConfigMap read by its metadata keeps the digests held for the same version (our own create or
        patch, which the watch then echoes); False when the held one is newer (the event is stale)."""
        held = self.children["ConfigMap"].get(key)
        if held is None or held["metadata"].get("uid") != obj["metadata"].get("uid"):
            return True
        version, held_version = obj["metadata"].get("resourceVersion"), held["metadata"].get("resourceVersion")
        if version == held_version:
            obj["dataDigests"] = held["dataDigests"]
            return True
        return _newer_or_same(version, held_version)

    def is_echo(self, body: Mapping[str, Any]) -> bool:
        """Whether an SFTJob event is our own last status write coming back (nothing new in it)."""
        meta = body.get("metadata") or {}
        written = self.written.get((meta.get("namespace", ""), meta.get("name", "")))
        return bool(written and written.uid == meta.get("uid") and written.resource_version == meta.get("resourceVersion"))

    def drop(self, kind: str, body: Mapping[str, Any]) -> Key | None:
        """A DELETED event: forget the object if it is the one we hold (same uid)."""
        key = key_of(kind, body)
        if key is not None:
            self._remove(kind, key, body)
        else:
            self._unseat(kind, body)
        return key

    def _unseat(self, kind: str, body: Mapping[str, Any]) -> None:
        """An object held as a child that is no longer one (orphaned: its controller reference was removed)
        leaves the child's place; the next reconcile finds it by the create's 409 and says whose it is."""
        meta = body.get("metadata") or {}
        slot = (meta.get("namespace", ""), (meta.get("labels") or {}).get(LABEL_JOB))
        if kind in CHILD_NAMES and (self.children[kind].get(slot) or {}).get("metadata", {}).get("uid") == meta.get("uid"):
            del self.children[kind][slot]

    def _remove(self, kind: str, key: Key, body: Mapping[str, Any]) -> None:
        uid = (body.get("metadata") or {}).get("uid")
        self.seen.pop(uid or "", None)
        if kind == "SFTJob":
            if (self.sftjobs.get(key) or {}).get("metadata", {}).get("uid") in (uid, None):
                self.forget(key)
        elif kind == "Pod":
            self._remember_replaced(key, slim(kind, body), deleted=True)
            pods = self.pods.get(key)
            if pods is not None:
                pods.pop(uid or "", None)
                if not pods:
                    del self.pods[key]
        elif (self.children[kind].get(key) or {}).get("metadata", {}).get("uid") == uid:
            del self.children[kind][key]

    def _remember_replaced(self, key: Key, pod: Mapping[str, Any], deleted: bool = False) -> None:
        """Note a pod the Job replaces without counting it: failed as a disruption or with exit 75/76/79, or
        deleted unfinished after a disruption (a lost node's pod force-deleted by the pod garbage collector
        never reports Failed)."""
        phase = (pod.get("status") or {}).get("phase")
        if (phase == "Failed" or (deleted and phase != "Succeeded")) and is_ignored_failure(pod):
            owner = controller_of(pod) or {}
            self.note(key).replaced_pods[pod["metadata"].get("uid", "")] = owner.get("uid", "")

    def forget(self, key: Key) -> None:
        sftjob = self.sftjobs.pop(key, None)
        if sftjob is not None:
            self.seen.pop(sftjob["metadata"].get("uid", ""), None)
        self.written.pop(key, None)
        self.notes.pop(key, None)
        self._count_phase(key)

    def note(self, key: Key) -> Notes:
        notes = self.notes.get(key)
        if notes is None:
            notes = self.notes[key] = Notes()
        return notes

    def record_write(self, key: Key, written: Mapping[str, Any]) -> None:
        """Our own status write (the API server's answer): newer than anything the watch has shown."""
        meta = written.get("metadata") or {}
        self.written[key] = Written(meta.get("uid", ""), meta.get("resourceVersion", ""), _plain(written.get("status") or {}))
        self._count_phase(key)
        if self.finished(key):  # the final status is written: the pods have said all they had to say
            self._drop_details(key)

    def result_read(self, key: Key) -> None:
        """A Succeeded job's result is in its status: its pods can go."""
        self.note(key).result_read = True
        if self.finished(key):
            self._drop_details(key)

    def _drop_details(self, key: Key) -> None:
        if not self.reads_pods(key):
            for pod in (self.pods.pop(key, None) or {}).values():
                self.seen.pop(pod["metadata"].get("uid", ""), None)
        for kind in DETAIL_KINDS:
            child = self.children[kind].pop(key, None)
            if child is not None:
                self.seen.pop(child["metadata"].get("uid", ""), None)

    def finished(self, key: Key) -> bool:
        return self.phases.get(key) in TERMINAL_PHASES

    def reads_pods(self, key: Key) -> bool:
        """Pods are read while a job runs, and once it succeeded until its result was read: rank 0's last
        update, with the result, can come after the Job's Complete (or after an operator restart)."""
        phase = self.phases.get(key)
        if phase not in TERMINAL_PHASES:
            return True
        notes = self.notes.get(key)
        return phase == Phase.succeeded.value and not (notes is not None and notes.result_read)

    def sweep(self, kind: str, namespaces: set[str] | None, live_uids: set[str], listed_at: float) -> set[Key]:
        """Drop objects of ``kind`` that a list begun at ``listed_at`` did not show (deleted while a
        watch was away). Objects the watch reported after the list began are kept."""
        def stale(key: Key, obj: Mapping[str, Any]) -> bool:
            uid = obj["metadata"].get("uid", "")
            in_scope = namespaces is None or key[0] in namespaces
            return in_scope and uid not in live_uids and self.seen.get(uid, 0.0) < listed_at

        if kind == "SFTJob":
            held = list(self.sftjobs.items())
        elif kind == "Pod":
            held = [(k, o) for k, pods in self.pods.items() for o in pods.values()]
        else:
            held = list(self.children[kind].items())
        gone = [(k, o) for k, o in held if stale(k, o)]
        for key, obj in gone:
            self._remove(kind, key, obj)
        return {key for key, _ in gone}

    # ---- reading ----

    def child(self, kind: str, key: Key) -> dict[str, Any] | None:
        return self.children[kind].get(key)

    def job_of(self, key: Key) -> dict[str, Any] | None:
        """This SFTJob's Job: one it controls (a same-named Job of an earlier SFTJob is not)."""
        job = self.children["Job"].get(key)
        uid = (self.sftjobs.get(key) or {}).get("metadata", {}).get("uid")
        return job if controlled_by(job, uid) else None

    def workload_of(self, key: Key, job_uid: str | None) -> dict[str, Any] | None:
        """Kueue's Workload of this key's Job (one of an earlier Job of the same name is not)."""
        workload = self.children[QUEUE_KIND].get(key)
        return workload if controlled_by(workload, job_uid) else None

    def pods_of(self, key: Key, job_uid: str | None) -> list[dict[str, Any]]:
        """Pods of this key's Job (pods of an earlier Job of the same name are ignored)."""
        pods = list((self.pods.get(key) or {}).values())
        return [p for p in pods if controlled_by(p, job_uid)] if job_uid else []

    def current_status(self, key: Key) -> dict[str, Any]:
        """The SFTJob's status: our last write if the watch has not caught up with it yet."""
        sftjob = self.sftjobs.get(key) or {}
        written = self.written.get(key)
        if written and written.uid == (sftjob.get("metadata") or {}).get("uid"):
            return written.status
        return sftjob.get("status") or {}

    def phase_counts(self) -> dict[str, int]:
        return {phase: n for phase, n in self.counts.items() if n > 0}

    def _count_phase(self, key: Key) -> None:
        old = self.phases.pop(key, None)
        if old is not None:
            self.counts[old] -= 1
        if key in self.sftjobs:
            phase = self.phases[key] = self.current_status(key).get("phase") or Phase.pending.value
            self.counts[phase] += 1
