"""Watch SFTJobs, their Jobs and their pods; each change re-derives the SFTJob's status.

These are plain event watchers (no finalizers, nothing stored on the objects). The Jobs and pods
are matched to their SFTJob by the ``sft.dev/job-name`` label the renderer puts on both; the
watches carry that label as a server-side selector (see main.configure), so the operator never
streams unrelated pods.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from .. import GROUP, PLURAL, VERSION, metrics
from ..render import LABEL_JOB
from ..status import TERMINAL_PHASES
from .state import ClusterState, Key, slim
from .sync import sync_status

log = logging.getLogger("sft_operator.children")


def _key(body: kopf.Body, name: str | None = None) -> Key:
    return (body["metadata"]["namespace"], name or body["metadata"]["name"])


@kopf.on.event(GROUP, VERSION, PLURAL)
async def sftjob_event(event: dict[str, Any], body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    state: ClusterState = memo.state
    key = _key(body)
    if event.get("type") == "DELETED":
        uid = body["metadata"].get("uid")
        if (state.sftjobs.get(key) or {}).get("metadata", {}).get("uid") in (uid, None):
            state.forget(key)
        metrics.remove_job(*key)
        metrics.set_phase_counts(state.phase_counts())
        return
    known = state.sftjobs.get(key)
    state.sftjobs[key] = slim("SFTJob", body)
    state.track_phase(key)
    if known is None:  # first sight (operator start): the Job and pods may already say more
        await sync_status(memo, key)
        if state.current_status(key).get("phase") in TERMINAL_PHASES:
            metrics.remove_job(*key)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_JOB: kopf.PRESENT})
async def job_event(event: dict[str, Any], body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    state: ClusterState = memo.state
    key = _key(body, body["metadata"]["labels"][LABEL_JOB])
    if event.get("type") == "DELETED":
        if (state.jobs.get(key) or {}).get("metadata", {}).get("uid") == body["metadata"].get("uid"):
            del state.jobs[key]
        await _recreate_if_needed(memo, key)
        return
    state.jobs[key] = slim("Job", body)
    await sync_status(memo, key)


@kopf.on.event("", "v1", "pods", labels={LABEL_JOB: kopf.PRESENT})
async def pod_event(event: dict[str, Any], body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    state: ClusterState = memo.state
    key = _key(body, body["metadata"]["labels"][LABEL_JOB])
    if event.get("type") == "DELETED":
        state.drop_pod(key, body["metadata"]["uid"])
    else:
        state.put_pod(key, slim("Pod", body))
    await sync_status(memo, key)


async def _recreate_if_needed(memo: Any, key: Key) -> None:
    """A Job deleted under a live, unfinished SFTJob comes back (level-triggered: the spec wants one)."""
    from .handle_reconcile import manage  # import cycle: manage uses sync, which this module uses too

    state: ClusterState = memo.state
    sftjob = state.sftjobs.get(key)
    if sftjob is None or sftjob["metadata"].get("deletionTimestamp"):
        return
    if state.current_status(key).get("phase") in TERMINAL_PHASES:
        await sync_status(memo, key)
        return
    log.info("Job of SFTJob %s/%s was deleted; recreating it", *key)
    try:
        await manage(memo, sftjob)
    except kopf.TemporaryError as exc:
        log.warning("recreating the Job of %s/%s failed: %s", *key, exc)
