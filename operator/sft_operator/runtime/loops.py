"""Around the watches: the periodic resync and relist, GPU-seconds, and picking up a rotated progress CA.

Deletion needs no handler: children carry ownerReferences, so garbage collection removes them,
and no Kopf change handler runs on SFTJobs, so Kopf adds no finalizer that could hang while the
operator is down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from sft_operator.runtime import metrics
from sft_operator.runtime.cache import Key
from sft_operator.runtime.client import ApiError
from sft_operator.runtime.context import Context
from sft_operator.runtime.watch import scopes

log = logging.getLogger("sft_operator.lifecycle")
RESYNC_SECONDS = 30.0
RELIST_EVERY = 10  # resync rounds between relists (5 minutes): catch deletions a watch missed


async def relist(ctx: Context) -> set[Key]:
    """List the SFTJobs that exist now and forget those the cache still holds but the cluster does not
    (a deletion Kopf's watch missed across a 410 relist: it reports only what exists). The children's
    watches do the same on every list of theirs (``sft_operator.runtime.watch``). Returns the SFTJobs forgotten."""
    scoped = [ns for ns, _ in scopes(ctx.settings.namespaces)]
    namespaces = None if scoped == [None] else set(scoped)
    listed_at = time.monotonic()
    live: set[str] = set()
    try:
        for scope in scoped:
            items = await ctx.kube.list("SFTJob", scope, metadata_only=True)
            live.update(i.get("metadata", {}).get("uid", "") for i in items)
    except ApiError as exc:
        log.warning("relist of SFTJobs failed (%s); next time", exc)
        return set()
    forgotten = ctx.cache.sweep("SFTJob", namespaces, live, listed_at)
    for key in forgotten:
        log.info("SFTJob %s/%s is gone (a missed deletion); forgetting it", *key)
        ctx.forget(key)
    return forgotten


async def resync_loop(ctx: Context, interval: float = RESYNC_SECONDS, relist_every: int = RELIST_EVERY) -> None:
    """Every ``interval``: reconcile and re-derive every SFTJob (a safety net for missed events: the same
    ``manage`` as on creation, so every child converges) and account GPU time; relist now and then."""
    last = time.monotonic()
    running: set[Key] = set()  # keys Running at the previous round: they are billed for the interval
    rounds = 0
    while True:
        await asyncio.sleep(interval)
        rounds += 1
        if rounds % relist_every == 0:
            await relist(ctx)
        now = time.monotonic()
        elapsed, last = now - last, now
        for key in running:
            sftjob = ctx.cache.sftjobs.get(key)
            if sftjob is not None:
                metrics.add_gpu_seconds(key[0], gpu_count(sftjob) * elapsed)
        for key in list(ctx.cache.sftjobs):
            ctx.kick(key)
            ctx.writer.mark(key)
        running = {k for k in ctx.cache.sftjobs if ctx.cache.current_status(k).get("phase") == "Running"}


def gpu_count(sftjob: dict[str, Any]) -> int:
    resources = (sftjob.get("spec") or {}).get("resources") or {}
    return int(resources.get("nodes", 1)) * int(resources.get("gpusPerNode", 1))


async def watch_ca_file(ctx: Context, interval: float) -> None:
    """A rotated progress CA (e.g. cert-manager renewed it) reaches every unfinished job's ConfigMap."""
    path = ctx.settings.progress_ca_file
    if not path:
        return
    seen = os.stat(path).st_mtime
    while True:
        await asyncio.sleep(interval)
        try:
            mtime = os.stat(path).st_mtime
            if mtime != seen:
                ctx.set_render_options(ctx.settings.render_options())
                seen = mtime
                log.info("progress CA %s changed; updating the jobs' ConfigMaps", path)
        except OSError as exc:  # mid-rotation: next time
            log.warning("progress CA %s not re-read yet: %s", path, exc)
