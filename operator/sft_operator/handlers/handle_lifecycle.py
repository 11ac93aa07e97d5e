"""Around the watches: priming the cache at start, the periodic resync and relist, GPU-seconds, and
picking up a rotated progress CA.

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

from .. import metrics
from ..cache import CHILD_KINDS, Key
from ..context import Context
from ..kube import ApiError
from ..render import LABEL_JOB

log = logging.getLogger("sft_operator.lifecycle")
RESYNC_SECONDS = 30.0
RELIST_EVERY = 10  # resync rounds between relists (5 minutes): catch deletions a watch missed
_KINDS = ("SFTJob", *CHILD_KINDS, "Pod")


def list_scopes(namespaces: tuple[str, ...]) -> list[str | None]:
    """Where to list: each watched namespace, or cluster-wide (None) when all or a glob are watched."""
    if not namespaces or any(c in ns for ns in namespaces for c in "*?![]"):
        return [None]
    return list(namespaces)


async def prime(ctx: Context) -> None:
    """Load the labelled children and pods before the watches start, so the first status derived after
    a restart sees the pods (a Running job is never reported Pending for a moment) and the first
    reconcile finds its children without a create-and-409 round trip."""
    counts = dict.fromkeys(_KINDS[1:], 0)
    for scope in list_scopes(ctx.settings.namespaces):
        for kind in counts:
            try:
                items = await ctx.kube.list(kind, scope, label_selector=LABEL_JOB)
            except ApiError as exc:
                log.warning("could not list %ss to prime the cache (%s); the watches will fill it", kind, exc)
                continue
            for item in items:
                item.setdefault("kind", kind)
                ctx.cache.put(kind, item)
            counts[kind] += len(items)
    log.info("primed the cache: %s", ", ".join(f"{n} {kind}(s)" for kind, n in counts.items()))


async def relist(ctx: Context) -> set[Key]:
    """List what exists now and drop what the cache still holds but the cluster does not (a deletion
    that a watch missed across a 410 relist). Returns the SFTJobs forgotten."""
    forgotten: set[Key] = set()
    scopes = list_scopes(ctx.settings.namespaces)
    namespaces = None if scopes == [None] else set(scopes)  # type: ignore[arg-type]
    for kind in _KINDS:
        listed_at = time.monotonic()
        live: set[str] = set()
        try:
            for scope in scopes:
                items = await ctx.kube.list(kind, scope, metadata_only=True,
                                            label_selector=None if kind == "SFTJob" else LABEL_JOB)
                live.update(i.get("metadata", {}).get("uid", "") for i in items)
        except ApiError as exc:
            log.warning("relist of %ss failed (%s); next time", kind, exc)
            continue
        touched = ctx.cache.sweep(kind, namespaces, live, listed_at)
        if kind == "SFTJob":
            for key in touched:
                log.info("SFTJob %s/%s is gone (a missed deletion); forgetting it", *key)
                ctx.forget(key)
            forgotten |= touched
        else:
            for key in touched:
                ctx.kick(key)
                ctx.writer.mark(key)
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
