"""The children's watches: the Jobs, pods, ConfigMaps and Services labelled ``sft.dev/job-name``.

Each (kind, namespace) pair lists (in pages of ``kube.LIST_PAGE_SIZE``), then watches from the list's
resourceVersion, and feeds the cache as it reads: an event is decoded, slimmed and handed over before
the next one is read, so a burst the operator cannot keep up with waits in TCP buffers, not as decoded objects in memory (a
Kopf watch queues every decoded event per object). After every list (at start, and after a 410
Gone or a broken stream) the cache forgets what the list no longer shows: a deletion that happened
while the watch was away is not missed. A list that fails (a timeout, a continue token that expired)
forgets nothing and is tried again after a backoff; until a scope's first list has completed, no
status is written there (``Context.unlisted``), so a restart never rewrites a Running job as Pending.

Services and claims are read by their metadata alone (the cache keeps nothing else of them), so they
are listed and watched as PartialObjectMetadata: less for the API server to send and for us to decode.
ConfigMaps are watched that way too, but listed whole: the cache keeps their data as digests, which
the list and our own creates and patches give; an event with a version whose data we have not seen
leaves the digests unknown, and the next reconcile reads that ConfigMap (``manage``).

Kueue's Workloads (``OPTIONAL_KINDS``) are watched too where Kueue is installed, all of them (they carry no
label of ours; the cache keeps those owned by a Job), so a queued job's status shows Kueue's own message.
Where the API server does not serve them (no Kueue) or RBAC forbids them, that watch says so once and
looks again every few minutes; nothing waits for it.

SFTJobs stay with Kopf (``runtime/handlers.py``); they are few and change rarely.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import time
from typing import TYPE_CHECKING, Any

from sft_operator.core.render import LABEL_JOB
from sft_operator.runtime.cache import CHILD_KINDS, QUEUE_KIND, Key
from sft_operator.runtime.client import ApiError

if TYPE_CHECKING:
    from sft_operator.runtime.context import Context

log = logging.getLogger("sft_operator.runtime.watch")
WATCHED_KINDS = (*CHILD_KINDS, "Pod")
OPTIONAL_KINDS = (QUEUE_KIND,)  # another controller's API: absent in many clusters
NOT_KICKED = ("Pod", QUEUE_KIND)  # kinds whose deletion needs no reconcile (we never create them)
OPTIONAL_RECHECK_SECONDS = 300.0
METADATA_WATCHED = ("ConfigMap", "Service", "PersistentVolumeClaim")
METADATA_LISTED = ("Service", "PersistentVolumeClaim")
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
        if key is not None and kind not in NOT_KICKED:
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
        self.label_selector = None if kind in OPTIONAL_KINDS else LABEL_JOB
        self.absent_reported = False

    def _wanted(self, body: dict[str, Any]) -> bool:
        if not self.patterns:
            return True
        namespace = (body.get("metadata") or {}).get("namespace", "")
        return any(fnmatch.fnmatchcase(namespace, p) for p in self.patterns)

    async def relist(self) -> str:
        """List page by page, feed the cache, and once the whole list is in, forget what is gone; the
        resourceVersion to watch from. A list that fails midway has only refreshed what it read:
        nothing is forgotten, and the caller lists again."""
        listed_at = time.monotonic()
        live: set[str] = set()
        version, pages = "", 0
        async for items, version in self.ctx.kube.list_pages(self.kind, self.namespace, label_selector=self.label_selector,
                                                             metadata_only=self.kind in METADATA_LISTED):
            pages += 1
            for item in items:
                if self._wanted(item):
                    item.setdefault("kind", self.kind)
                    child_event(self.ctx, self.kind, None, item)
                    live.add((item.get("metadata") or {}).get("uid", ""))
            del items  # before the next page is read: one page in memory at a time
        namespaces = {self.namespace} if self.namespace else None
        for key in self.ctx.cache.sweep(self.kind, namespaces, live, listed_at):
            if self.kind not in NOT_KICKED:
                self.ctx.kick(key)
            self.ctx.writer.mark(key)
        self.ctx.unlisted.discard((self.kind, self.namespace))
        self.listed.set()
        log.info("listed %d %ss%s in %d page%s (%.1fs)", len(live), self.kind, self._where(), pages,
                 "" if pages == 1 else "s", time.monotonic() - listed_at)
        return version

    async def _absent(self, exc: ApiError) -> None:
        """An optional API that is not served (404) or not granted (403): said once, looked for again later."""
        if not self.absent_reported:
            self.absent_reported = True
            why = "not installed" if exc.status == 404 else f"not readable by this operator ({exc})"
            log.info("%ss%s: %s; queued jobs show the operator's own message. Looking again every %.0fs",
                     self.kind, self._where(), why, OPTIONAL_RECHECK_SECONDS)
        await asyncio.sleep(OPTIONAL_RECHECK_SECONDS)

    def _where(self) -> str:
        return f" in {self.namespace}" if self.namespace else ""

    async def run(self) -> None:
        delay = RETRY_FIRST_SECONDS
        version = ""
        while True:
            try:
                if not version:
                    version = await self.relist()
                async for event in self.ctx.kube.watch(self.kind, self.namespace, resource_version=version,
                                                       label_selector=self.label_selector, timeout_seconds=WATCH_SECONDS,
                                                       metadata_only=self.kind in METADATA_WATCHED):
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
                if exc.status == 410 and version:  # the watch's version is too old: list again at once
                    version = ""
                    continue
                if self.kind in OPTIONAL_KINDS and exc.status in (403, 404):
                    await self._absent(exc)
                    version = ""
                    continue
                # A list that failed (a 410 here is an expired continue token) or a broken watch: the cache
                # keeps what it knows, and the next list, after a backoff, shows what was missed meanwhile.
                log.warning("%s of %ss%s failed (%s); again in %.0fs", "watch" if version else "list", self.kind,
                            self._where(), exc, delay)
                version = ""
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX_SECONDS, delay * 2)


def start_watchers(ctx: Context) -> list[Watcher]:
    """Start every watch; returns those the operator's status depends on (the optional ones aside)."""
    where = scopes(ctx.settings.namespaces)
    watchers = [Watcher(ctx, kind, namespace, patterns) for namespace, patterns in where for kind in WATCHED_KINDS]
    optional = [Watcher(ctx, kind, namespace, patterns) for namespace, patterns in where for kind in OPTIONAL_KINDS]
    # Until each has listed once, no status is written in its scope: after a restart, a job whose pods
    # are not in the cache yet would be derived Pending.
    ctx.unlisted.update((w.kind, w.namespace) for w in watchers)
    for watcher in (*watchers, *optional):
        ctx.scheduler.spawn(watcher.run(), name=f"watch {watcher.kind} {watcher.namespace or '*'}")
    return watchers
