"""The children's watches: the Jobs, pods, ConfigMaps and Services labelled ``sft.dev/job-name``.

Each (kind, namespace) pair lists, then watches from the list's resourceVersion, and feeds the
cache as it reads: an event is decoded, slimmed and handed over before the next one is read, so a
burst the operator cannot keep up with waits in TCP buffers, not as decoded objects in memory (a
Kopf watch queues every decoded event per object). After every list (at start, and after a 410
Gone or a broken stream) the cache forgets what the list no longer shows: a deletion that happened
while the watch was away is not missed.

SFTJobs stay with Kopf (``handlers/handle_watches.py``); they are few and change rarely.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import time
from typing import TYPE_CHECKING, Any

from .cache import CHILD_KINDS, Key
from .kube import ApiError
from .render import LABEL_JOB

if TYPE_CHECKING:
    from .context import Context

log = logging.getLogger("sft_operator.watch")
WATCHED_KINDS = (*CHILD_KINDS, "Pod")
WATCH_SECONDS = 300  # the API server ends each watch after this; the watcher goes on from where it was
RETRY_FIRST_SECONDS, RETRY_MAX_SECONDS = 1.0, 30.0


def scopes(namespaces: tuple[str, ...]) -> list[tuple[str | None, tuple[str, ...]]]:
    """Where to watch: each namespace, or cluster-wide (None) when all or a glob are watched (then
    filtered by the patterns)."""
    if not namespaces:
        return [(None, ())]
    if any(c in ns for ns in namespaces for c in "*?![]"):
        return [(None, namespaces)]
    return [(ns, ()) for ns in namespaces]


def child_event(ctx: Context, kind: str, event_type: str | None, body: dict[str, Any]) -> Key | None:
    """One watch event into the cache; asks for a reconcile (a child deleted) and a status write."""
    if event_type == "DELETED":
        key = ctx.cache.drop(kind, body)
        if key is not None and kind != "Pod":
            ctx.kick(key)  # level-triggered: the spec still wants it (unless the job is finished)
    else:
        key = ctx.cache.put(kind, body)
    if key is not None and key in ctx.cache.sftjobs:
        ctx.writer.mark(key)
    return key


class Watcher:
    """List and watch one kind in one scope, for as long as the operator runs."""

    def __init__(self, ctx: Context, kind: str, namespace: str | None, patterns: tuple[str, ...] = ()) -> None:
        self.ctx, self.kind, self.namespace, self.patterns = ctx, kind, namespace, patterns
        self.listed = asyncio.Event()  # set after the first complete list

    def _wanted(self, body: dict[str, Any]) -> bool:
        if not self.patterns:
            return True
        namespace = (body.get("metadata") or {}).get("namespace", "")
        return any(fnmatch.fnmatchcase(namespace, p) for p in self.patterns)

    async def relist(self) -> str:
        """List, feed the cache, forget what is gone; the resourceVersion to watch from."""
        listed_at = time.monotonic()
        items, version = await self.ctx.kube.list_with_version(self.kind, self.namespace, label_selector=LABEL_JOB)
        live = set()
        for item in items:
            if self._wanted(item):
                item.setdefault("kind", self.kind)
                child_event(self.ctx, self.kind, None, item)
                live.add((item.get("metadata") or {}).get("uid", ""))
        namespaces = {self.namespace} if self.namespace else None
        for key in self.ctx.cache.sweep(self.kind, namespaces, live, listed_at):
            if self.kind != "Pod":
                self.ctx.kick(key)
            self.ctx.writer.mark(key)
        self.listed.set()
        return version

    async def run(self) -> None:
        delay = RETRY_FIRST_SECONDS
        version = ""
        while True:
            try:
                if not version:
                    version = await self.relist()
                async for event in self.ctx.kube.watch(self.kind, self.namespace, resource_version=version,
                                                       label_selector=LABEL_JOB, timeout_seconds=WATCH_SECONDS):
                    kind, body = event.get("type"), event.get("object") or {}
                    if kind == "ERROR":  # 410 Gone: the version is too old to watch from; list again
                        version = ""
                        break
                    version = (body.get("metadata") or {}).get("resourceVersion") or version
                    if kind != "BOOKMARK" and self._wanted(body):
                        child_event(self.ctx, self.kind, kind, body)
                delay = RETRY_FIRST_SECONDS
            except asyncio.CancelledError:
                raise
            except ApiError as exc:
                if exc.status == 410:
                    version = ""
                    continue
                log.warning("watch of %ss%s failed (%s); again in %.0fs", self.kind,
                            f" in {self.namespace}" if self.namespace else "", exc, delay)
                version = ""  # whatever was missed meanwhile, the next list shows
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX_SECONDS, delay * 2)


def start_watchers(ctx: Context) -> list[Watcher]:
    watchers = [Watcher(ctx, kind, namespace, patterns)
                for namespace, patterns in scopes(ctx.settings.namespaces) for kind in WATCHED_KINDS]
    for watcher in watchers:
        ctx.scheduler.spawn(watcher.run(), name=f"watch {watcher.kind} {watcher.namespace or '*'}")
    return watchers
