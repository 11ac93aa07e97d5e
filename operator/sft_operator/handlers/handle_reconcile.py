"""create, resume and update all run one idempotent, level-triggered manage() (poolboy style).

manage() acts on what exists, not on the event: it renders the children, creates the missing
ones (409 AlreadyExists is success, names are deterministic, so a crash at any point followed
by a rerun never duplicates), adopts existing ones, and applies runPolicy.suspend to the Job.
It never writes the SFTJob's spec and never touches Job fields other than spec.suspend.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from .. import GROUP, PLURAL, VERSION, metrics
from ..advice import advise
from ..api import SFTJob
from ..reconcile import (
    ChildConflict,
    adoption_patch,
    api_error_cause,
    prepare_job,
    retry_delay,
    suspend_patch,
)
from ..render import render_children
from ..status import TERMINAL_PHASES, Cause
from .kube import CREATE
from .state import ClusterState, Key, slim
from .sync import emit, sync_status

log = logging.getLogger("sft_operator.reconcile")


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def reconcile(body: kopf.Body, memo: kopf.Memo, retry: int, logger: kopf.Logger, **_: Any) -> None:
    started = time.monotonic()
    try:
        await manage(memo, slim("SFTJob", body), retry=retry)
    except Exception:
        metrics.record_reconcile_error()
        raise
    finally:
        metrics.observe_reconcile(time.monotonic() - started)


async def manage(memo: Any, sftjob: dict[str, Any], retry: int = 0) -> None:
    """Bring the children of one SFTJob to what its spec says; then derive its status."""
    state: ClusterState = memo.state
    meta = sftjob["metadata"]
    key: Key = (meta["namespace"], meta["name"])
    state.sftjobs[key] = sftjob
    state.track_phase(key)
    if state.current_status(key).get("phase") in TERMINAL_PHASES or meta.get("deletionTimestamp"):
        return  # finished: never recreate a deleted Job (it would train again)

    try:
        parsed = SFTJob.model_validate(sftjob)
    except ValidationError as exc:  # the API server's schema should have caught it
        await _creation_failed(memo, sftjob, key, Cause("InvalidSpec", str(exc)[:2048]))
        raise kopf.PermanentError(f"invalid SFTJob spec: {exc}") from exc

    try:
        job = await _ensure_children(memo, sftjob, parsed)
    except ApiException as exc:
        cause = getattr(exc, "cause", None) or api_error_cause(exc.status, exc.body, "a child of", meta["name"])
        await _creation_failed(memo, sftjob, key, cause)
        raise kopf.TemporaryError(f"{cause.reason}: {cause.message}", delay=retry_delay(retry)) from exc
    except ChildConflict as exc:
        await _creation_failed(memo, sftjob, key, Cause("ChildConflict", str(exc)))
        raise kopf.TemporaryError(str(exc), delay=retry_delay(retry)) from exc

    if state.creation_errors.pop(key, None) is not None:
        log.info("SFTJob %s/%s: children created after earlier failures", *key)
    state.jobs[key] = slim("Job", job)

    patch = suspend_patch(parsed.spec.run_policy.suspend, job)
    if patch is not None:
        job = await state.gate.run(CREATE, memo.kube.patch, "Job", meta["namespace"], job["metadata"]["name"], patch)
        state.jobs[key] = slim("Job", job)
        if "suspend" in patch.get("spec", {}):
            if patch["spec"]["suspend"]:
                emit(sftjob, "Normal", "Suspended", "runPolicy.suspend is true: the trainer Job is suspended")
            else:
                emit(sftjob, "Normal", "Resumed", "runPolicy.suspend is false: the trainer Job is resumed")
    await sync_status(memo, key)


async def _ensure_children(memo: Any, sftjob: dict[str, Any], parsed: SFTJob) -> dict[str, Any]:
    """Create or adopt the ConfigMap, Service and Job (in that order); return the Job."""
    job: dict[str, Any] = {}
    for child in render_children(parsed, memo.render_options):
        kind = child["kind"]
        if kind == "Job":
            child = prepare_job(child)
        try:
            created, obj = await memo.state.gate.run(CREATE, memo.kube.create, child)
            if not created:
                patch = adoption_patch(obj, sftjob)
                if patch is not None:
                    obj = await memo.state.gate.run(
                        CREATE,
                        memo.kube.patch, kind, child["metadata"]["namespace"], child["metadata"]["name"], patch
                    )
                    emit(sftjob, "Normal", "Adopted", f"adopted existing {kind} {child['metadata']['name']}")
        except ApiException as exc:
            exc.cause = api_error_cause(exc.status, exc.body, kind, child["metadata"]["name"])  # type: ignore[attr-defined]
            raise
        if kind == "Job":
            job = obj
            if created:
                _announce_creation(sftjob, parsed, obj)
    return job


def _announce_creation(sftjob: dict[str, Any], parsed: SFTJob, job: dict[str, Any]) -> None:
    namespace = sftjob["metadata"]["namespace"]
    metrics.record_created(namespace)
    res = parsed.spec.resources
    emit(
        sftjob,
        "Normal",
        "Created",
        f"created ConfigMap, Service and Job {job['metadata']['name']} "
        f"({res.nodes} node(s) x {res.gpus_per_node} GPU(s), effective batch {parsed.spec.effective_batch_size})",
    )
    for advice in advise(parsed.spec):
        emit(sftjob, "Warning", advice.reason, str(advice))


async def _creation_failed(memo: Any, sftjob: dict[str, Any], key: Key, cause: Cause) -> None:
    state: ClusterState = memo.state
    previous = state.creation_errors.get(key)
    state.creation_errors[key] = cause
    if previous != cause:
        emit(sftjob, "Warning", cause.reason, cause.message)
        log.warning("SFTJob %s/%s: %s: %s", *key, cause.reason, cause.message)
    await sync_status(memo, key)
