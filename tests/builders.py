"""The one set of test builders: SFTJobs, Jobs and pods as the API server holds them.

Unit, integration and trainer tests import these (``from builders import ...``; tests/ is on the path);
a test states only what matters to it, the rest is a realistic default.
"""

from __future__ import annotations

import copy
from typing import Any

API_VERSION = "sft.dev/v1alpha1"
T0 = "2026-11-28T11:50:00Z"  # when the default objects were created and their trainer started
T1 = "2026-11-28T11:55:00Z"

MINIMAL: dict[str, Any] = {
    "apiVersion": API_VERSION,
    "kind": "SFTJob",
    "metadata": {"name": "demo", "namespace": "team-a"},
    "spec": {
        "model": {"source": "Qwen/Qwen2.5-0.5B"},
        "dataset": {"train": {"source": "pvc://datasets/train.jsonl"}},
        "output": {"destination": "pvc://models/demo"},
    },
}


def merged(base: dict[str, Any], **spec: Any) -> dict[str, Any]:
    """``base`` with ``spec``'s fields: a dict merged one level deep, anything else replaced."""
    out = copy.deepcopy(base)
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def manifest(**spec_overrides: Any) -> dict[str, Any]:
    """The minimal valid SFTJob (team-a/demo, data and output on claims), top-level spec fields replaced."""
    doc = copy.deepcopy(MINIMAL)
    doc["spec"].update(spec_overrides)
    return doc


def cluster_manifest(name: str, **spec: Any) -> dict[str, Any]:
    """An SFTJob to create on the test cluster (no namespace: the API call gives it) whose hub model is
    fetched into the cache claim the operator creates (`<name>-cache`, bound by kwok's volume stage), as
    most users' jobs are; eight GPUs, so it lands on a kwok GPU node; no retries."""
    base: dict[str, Any] = {
        "model": {"source": "Qwen/Qwen2.5-0.5B"},
        "dataset": {"train": {"source": "/data/train.jsonl"}},
        "output": {"destination": f"s3://models/{name}"},
        "resources": {"gpusPerNode": 8},
        "runPolicy": {"backoffLimit": 0},
    }
    return to_create(name, merged(base, **spec))


def to_create(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """An SFTJob with this spec, as a client sends it (the API call gives the namespace)."""
    return {"apiVersion": API_VERSION, "kind": "SFTJob", "metadata": {"name": name}, "spec": copy.deepcopy(spec)}


def sftjob(status: dict[str, Any] | None = None, suspend: bool = False, generation: int = 1, *,
           name: str = "demo", namespace: str = "team-a", uid: str = "u-1", spec: dict[str, Any] | None = None,
           **metadata: Any) -> dict[str, Any]:
    """An SFTJob as stored: ``spec`` (default: ``runPolicy`` alone, from ``suspend``, backoffLimit 3, which is
    all that status derivation reads), ``metadata`` fields such as resourceVersion or creationTimestamp."""
    doc: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": "SFTJob",
        "metadata": {"name": name, "namespace": namespace, "generation": generation, "uid": uid, **metadata},
        "spec": copy.deepcopy(spec) if spec is not None else {"runPolicy": {"suspend": suspend, "backoffLimit": 3}},
    }
    if status is not None:
        doc["status"] = status
    return doc


def controller(kind: str, name: str, uid: str, api_version: str) -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": kind, "name": name, "uid": uid, "controller": True}


def job(conditions: list[dict[str, Any]] | None = None, suspend: bool = False, labels: dict[str, str] | None = None,
        *, name: str = "demo", namespace: str = "team-a", uid: str | None = None, owner_uid: str | None = None,
        created: str | None = None, annotations: dict[str, str] | None = None, **status: Any) -> dict[str, Any]:
    """Our trainer Job (one pod): ``owner_uid`` the controlling SFTJob's uid, ``status`` its status fields."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": {"sft.dev/job-name": name, **(labels or {})}}
    if uid is not None:
        meta["uid"] = uid
    if created is not None:
        meta["creationTimestamp"] = created
    if annotations is not None:
        meta["annotations"] = dict(annotations)
    if owner_uid is not None:
        meta["ownerReferences"] = [controller("SFTJob", name, owner_uid, API_VERSION)]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {"suspend": suspend, "completions": 1, "parallelism": 1},
        "status": {"conditions": conditions or [], **status},
    }


def jcond(kind: str, reason: str = "", message: str = "", when: str = T1) -> dict[str, Any]:
    """A Job condition that holds."""
    return {"type": kind, "status": "True", "reason": reason, "message": message, "lastTransitionTime": when}


def pod(name: str = "demo-0-abcde", phase: str = "Running", state: dict[str, Any] | None = None,
        conditions: list[dict[str, Any]] | None = None, deleting: bool = False, uid: str = "pod-1", *,
        namespace: str = "team-a", job: str = "demo", index: int = 0, job_uid: str | None = None,
        created: str = T0, resource_version: str | None = None, spec: dict[str, Any] | None = None,
        **status: Any) -> dict[str, Any]:
    """A trainer pod of Job ``job`` (rank ``index``): ``state`` its container's state (default running since
    T0), ``job_uid`` the controlling Job's uid, ``status`` more status fields."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "uid": uid, "creationTimestamp": created,
                            "labels": {"sft.dev/job-name": job, "batch.kubernetes.io/job-completion-index": str(index)}}
    if resource_version is not None:
        meta["resourceVersion"] = resource_version
    if job_uid is not None:
        meta["ownerReferences"] = [controller("Job", job, job_uid, "batch/v1")]
    if deleting:
        meta["deletionTimestamp"] = T1
    container = {"name": "trainer", "image": "ghcr.io/sft-operator/trainer:0.1.0", "ready": phase == "Running",
                 "restartCount": 0, "state": state if state is not None else {"running": {"startedAt": T0}}}
    out: dict[str, Any] = {
        "kind": "Pod",
        "metadata": meta,
        "status": {
            "phase": phase,
            "conditions": conditions if conditions is not None else [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": T0}
            ],
            "containerStatuses": [container],
            **status,
        },
    }
    if spec is not None:
        out["spec"] = copy.deepcopy(spec)
    return out


def terminated(code: int, reason: str = "Error", message: str = "") -> dict[str, Any]:
    """A container state: ended with exit ``code`` (its termination message ``message``)."""
    return {"terminated": {"exitCode": code, "reason": reason, "message": message, "startedAt": T0, "finishedAt": T1}}


def waiting(reason: str, message: str = "") -> dict[str, Any]:
    """A container state: not started, for ``reason``."""
    return {"waiting": {"reason": reason, "message": message}}
