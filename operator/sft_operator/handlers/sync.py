"""Write an SFTJob's status from the in-memory view, only when it changed; report transitions.

Every watcher (SFTJob, Job, pod) and the periodic resync end here. One lock per SFTJob keeps
the derive-compare-patch step serial, so an older view never overwrites a newer one.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import datetime, timezone
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from .. import metrics
from ..api import SFTJobSpec
from ..reconcile import ANNOTATION_STOPPED_REASON, ANNOTATION_SUSPENDED_BY, SUSPENDED_BY_OPERATOR
from ..status import (
    FAILED,
    IMAGE_PULL_FAILED,
    PENDING,
    RESTARTING,
    IMAGE_PULL_REASONS,
    RESTARTING_C,
    RUNNING,
    SUCCEEDED,
    TERMINAL_PHASES,
    condition,
    derive_status,
    duration_seconds,
    job_condition,
    owned,
    parse_time,
    pod_creation_cause,
    status_patch,
)
from .kube import STATUS
from .state import ClusterState, Key

log = logging.getLogger("sft_operator.status")
IMAGE_PULL_RECHECK_SECONDS = 5.0  # while a pull fails, look again so the grace period is honoured
POD_CREATION_CHECK_SECONDS = 5.0  # a Job without pods this long: read its FailedCreate events
POD_CREATION_RECHECK_SECONDS = 30.0  # then again at this pace while it still has none


def _now() -> datetime:
    return datetime.now(timezone.utc)


def effective_batch_size(state: ClusterState, sftjob: dict[str, Any]) -> int | None:
    meta = sftjob.get("metadata") or {}
    cache_key = (meta.get("uid", ""), meta.get("generation", 0))
    if cache_key not in state.effective_batch:
        try:
            state.effective_batch[cache_key] = SFTJobSpec.model_validate(sftjob.get("spec") or {}).effective_batch_size
        except ValueError:
            return None
    return state.effective_batch[cache_key]


def _job_of(state: ClusterState, key: Key, sftjob: dict[str, Any]) -> dict[str, Any] | None:
    """This SFTJob's Job: one controlled by it (a same-named Job of an earlier SFTJob is not)."""
    job = state.jobs.get(key)
    if job is None:
        return None
    uid = sftjob["metadata"].get("uid")
    refs = job["metadata"].get("ownerReferences") or []
    return job if any(r.get("uid") == uid and r.get("controller") for r in refs) else None


def _message(exc: ApiException) -> str:
    try:
        return json.loads(exc.body or "{}").get("message") or str(exc.reason)
    except ValueError:
        return str(exc.reason)


def _ref(sftjob: dict[str, Any]) -> dict[str, Any]:
    meta = sftjob["metadata"]
    return {
        "apiVersion": sftjob.get("apiVersion", "sft.dev/v1alpha1"),
        "kind": sftjob.get("kind", "SFTJob"),
        "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta.get("uid")},
    }


def emit(sftjob: dict[str, Any], kind: str, reason: str, message: str) -> None:
    """A Kubernetes Event on the SFTJob (queued; Kopf posts it with retries)."""
    kopf.event(_ref(sftjob), type=kind, reason=reason, message=message[:1024])


async def sync_status(memo: Any, key: Key) -> dict[str, Any] | None:
    """Derive the status of one SFTJob and patch it if it changed. Returns the operator's status."""
    state: ClusterState = memo.state
    async with state.lock(key):
        sftjob = state.sftjobs.get(key)
        if sftjob is None or (sftjob.get("metadata") or {}).get("deletionTimestamp"):
            return None
        current = state.current_status(key)
        doc = {**sftjob, "status": current}
        job = _job_of(state, key, sftjob)
        pods = state.pods_of(key, (job or {}).get("metadata", {}).get("uid")) if job else []
        desired = derive_status(
            doc,
            job,
            pods,
            _now(),
            image_pull_grace_seconds=memo.settings.image_pull_grace_seconds,
            effective_batch_size=effective_batch_size(state, sftjob),
            creation_error=state.creation_errors.get(key),
            pod_creation_error=state.pod_creation_errors.get(key) if job and not pods else None,
        )
        patch = status_patch(current, desired)
        if patch is not None:
            namespace, name = key
            try:
                await memo.state.gate.run(STATUS, memo.kube.patch_status, namespace, name, patch)
            except ApiException as exc:
                if exc.status == 404:  # deleted meanwhile
                    return None
                metrics.record_reconcile_error()
                log.warning("SFTJob %s/%s: status patch rejected (%s): %s; retrying on the next change or resync",
                            namespace, name, exc.status, _message(exc))
                return None
            state.written[key] = (sftjob["metadata"].get("uid"), desired)
            state.track_phase(key)
            await _report_transition(memo, sftjob, job, owned(current), desired)
            metrics.set_phase_counts(state.phase_counts())
        if pods:
            state.pod_creation_errors.pop(key, None)
        _schedule_followups(memo, key, sftjob, desired, job, bool(pods))
        return desired


async def _report_transition(
    memo: Any, sftjob: dict[str, Any], job: dict[str, Any] | None, before: dict[str, Any], after: dict[str, Any]
) -> None:
    namespace = sftjob["metadata"]["namespace"]
    name = sftjob["metadata"]["name"]
    old_phase, phase = before.get("phase"), after.get("phase")
    if phase == old_phase and after.get("restarts", 0) <= before.get("restarts", 0):
        return
    log.info("SFTJob %s/%s: %s -> %s", namespace, name, old_phase or "-", phase)
    if after.get("restarts", 0) > before.get("restarts", 0):
        cond = condition(after, RESTARTING_C) or {}
        emit(sftjob, "Warning", "Restarted",
             f"trainer pod replaced (restart {after['restarts']})" + (f": {cond['message']}" if cond.get("message") else ""))
    if phase == RUNNING and old_phase != RUNNING:
        emit(sftjob, "Normal", "Started", f"{name}: trainer pods running")
        if not before.get("startTime"):
            created = parse_time(sftjob["metadata"].get("creationTimestamp"))
            if created:
                metrics.record_running(namespace, (_now() - created).total_seconds())
    if phase in TERMINAL_PHASES and old_phase not in TERMINAL_PHASES:
        cond = condition(after, phase) or {}
        reason = cond.get("reason", phase)
        if phase == SUCCEEDED:
            emit(sftjob, "Normal", "Succeeded", f"training finished: {cond.get('message', '')}".strip())
        else:
            emit(sftjob, "Warning", "Failed", f"{reason}: {cond.get('message', '')}")
        metrics.record_finished(namespace, phase, reason, duration_seconds(after))
        metrics.remove_job(namespace, name)  # per-job series live only while the job runs
        if phase == FAILED and reason == IMAGE_PULL_FAILED and job is not None:
            await _stop_job(memo, job, reason)


async def _stop_job(memo: Any, job: dict[str, Any], reason: str) -> None:
    """The Job controller never gives up on an image pull; we declared Failed, so free the GPUs."""
    if job_condition(job, "Complete") or job_condition(job, "Failed"):
        return
    meta = job["metadata"]
    patch = {
        "metadata": {"annotations": {ANNOTATION_SUSPENDED_BY: SUSPENDED_BY_OPERATOR, ANNOTATION_STOPPED_REASON: reason}},
        "spec": {"suspend": True},
    }
    try:
        await asyncio.to_thread(memo.kube.patch, "Job", meta["namespace"], meta["name"], patch)
    except ApiException as exc:
        log.warning("could not stop Job %s/%s: %s", meta["namespace"], meta["name"], exc.reason)


def _schedule_followups(
    memo: Any, key: Key, sftjob: dict[str, Any], desired: dict[str, Any], job: dict[str, Any] | None, has_pods: bool
) -> None:
    """Time-driven changes: the end of an image-pull grace period, ttlSecondsAfterFinished, and a
    look at the Job's FailedCreate events while it has no pods."""
    state: ClusterState = memo.state
    phase = desired.get("phase")
    running = condition(desired, "Running") or {}
    waiting_for_pods = (
        job is not None and not has_pods and phase in (PENDING, RESTARTING) and not (job.get("spec") or {}).get("suspend")
    )
    if waiting_for_pods and key not in state.pod_checks:
        loop = asyncio.get_running_loop()

        def check() -> None:
            state.pod_checks.pop(key, None)
            state.spawn(_check_pod_creation(memo, key, job))

        delay = POD_CREATION_RECHECK_SECONDS if key in state.pod_creation_errors else POD_CREATION_CHECK_SECONDS
        state.pod_checks[key] = loop.call_later(delay, check)
    if phase not in TERMINAL_PHASES and running.get("reason") in IMAGE_PULL_REASONS and key not in state.timers:
        loop = asyncio.get_running_loop()

        def fire() -> None:
            state.timers.pop(key, None)
            state.spawn(sync_status(memo, key))

        state.timers[key] = loop.call_later(IMAGE_PULL_RECHECK_SECONDS, fire)
    ttl = ((sftjob.get("spec") or {}).get("runPolicy") or {}).get("ttlSecondsAfterFinished")
    if phase in TERMINAL_PHASES and ttl is not None and key not in state.ttl_tasks:
        finished = parse_time(desired.get("completionTime")) or _now()
        delay = max(0.0, finished.timestamp() + ttl - _now().timestamp())
        state.ttl_tasks[key] = state.spawn(_delete_after(memo, key, sftjob["metadata"]["uid"], delay))


async def _check_pod_creation(memo: Any, key: Key, job: dict[str, Any]) -> None:
    meta = job["metadata"]
    try:
        message = await asyncio.to_thread(memo.kube.failed_create_message, meta["namespace"], meta["name"], meta["uid"])
    except ApiException as exc:  # e.g. no RBAC to list events: status just says less
        log.debug("cannot list events of Job %s/%s: %s", meta["namespace"], meta["name"], exc.reason)
        return
    if message and memo.state.pod_creation_errors.get(key) != (cause := pod_creation_cause(message)):
        memo.state.pod_creation_errors[key] = cause
        log.warning("SFTJob %s/%s: %s", *key, cause.message)
    await sync_status(memo, key)


async def _delete_after(memo: Any, key: Key, uid: str, delay: float) -> None:
    await asyncio.sleep(delay)
    namespace, name = key
    log.info("SFTJob %s/%s: ttlSecondsAfterFinished passed, deleting it", namespace, name)
    try:
        await asyncio.to_thread(memo.kube.delete_sftjob, namespace, name, uid)
    finally:
        memo.state.ttl_tasks.pop(key, None)
