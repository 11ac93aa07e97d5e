"""Lifecycle around the watches: priming the view at start, a periodic resync, GPU-seconds.

Deletion needs no handler here: children carry ownerReferences, so garbage collection removes
them, and the operator registers no deletion handler, timer or daemon on SFTJobs, so Kopf adds
no finalizer that could hang when the operator is down. ttlSecondsAfterFinished is scheduled by
``sync`` when a job finishes and re-armed by this resync after a restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from kubernetes.client.exceptions import ApiException

from .. import metrics
from ..render import LABEL_JOB
from .state import ClusterState, slim
from .sync import sync_status

log = logging.getLogger("sft_operator.lifecycle")
RESYNC_SECONDS = 30.0


async def prime(memo: Any) -> None:
    """Load existing Jobs and pods before the watches start, so the first status we derive after a
    restart sees the pods (and never reports a Running job as Pending for a moment)."""
    state: ClusterState = memo.state
    namespaces = [ns for ns in memo.settings.namespaces if not any(c in ns for c in "*?![]")] or [None]
    if memo.settings.namespaces and len(namespaces) != len(memo.settings.namespaces):
        namespaces = [None]  # globs: list cluster-wide
    for namespace in namespaces:
        try:
            jobs = await asyncio.to_thread(memo.kube.list_labelled, "Job", namespace, LABEL_JOB)
            pods = await asyncio.to_thread(memo.kube.list_labelled, "Pod", namespace, LABEL_JOB)
        except ApiException as exc:
            log.warning("could not list Jobs/pods to prime the view (%s); the watches will fill it", exc.reason)
            return
        for job in jobs:
            meta = job["metadata"]
            state.jobs[(meta["namespace"], meta["labels"][LABEL_JOB])] = slim("Job", job)
        for pod in pods:
            meta = pod["metadata"]
            state.put_pod((meta["namespace"], meta["labels"][LABEL_JOB]), slim("Pod", pod))
    log.info("primed the view with %d Job(s) and %d pod group(s)", len(state.jobs), len(state.pods))


async def resync_loop(memo: Any, interval: float = RESYNC_SECONDS) -> None:
    """Every `interval`: re-derive every status (a safety net for missed events) and account GPU time."""
    state: ClusterState = memo.state
    last = time.monotonic()
    running: set = set()  # keys Running at the previous round: they are billed for the interval
    while True:
        await asyncio.sleep(interval)
        now = time.monotonic()
        elapsed, last = now - last, now
        for key in running:
            sftjob = state.sftjobs.get(key)
            if sftjob is not None:
                metrics.add_gpu_seconds(key[0], gpu_count(sftjob) * elapsed)
        for key in list(state.sftjobs):
            try:
                await sync_status(memo, key)
            except Exception as exc:  # keep the loop alive; the next round retries
                log.warning("resync of %s/%s failed: %s", *key, exc)
        running = {k for k in state.sftjobs if state.current_status(k).get("phase") == "Running"}


def gpu_count(sftjob: dict[str, Any]) -> int:
    resources = (sftjob.get("spec") or {}).get("resources") or {}
    return int(resources.get("nodes", 1)) * int(resources.get("gpusPerNode", 1))
