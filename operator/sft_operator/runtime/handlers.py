"""Every Kopf registration of the operator: start-up (all of Kopf's settings), login, clean-up, the
liveness probes, and the SFTJob watch.

The SFTJob watch is a plain event watcher: Kopf stores nothing on the SFTJobs (no finalizer, no
annotation patch). Every change feeds the cache and asks for a reconcile (``runtime.reconcile``) and
a status write (``runtime.writer``); nothing here waits for either. The children and pods are watched
by ``runtime.watch`` (one list-then-watch per kind, fed straight into the cache).
"""

from __future__ import annotations

import asyncio
from typing import Any

import kopf

from sft_operator.api import GROUP, PLURAL, VERSION
from sft_operator.runtime import metrics, progress_server
from sft_operator.runtime.client import KubeClient
from sft_operator.runtime.context import Context
from sft_operator.runtime.credentials import connection_info, load_credentials
from sft_operator.runtime.loops import resync_loop, watch_ca_file
from sft_operator.runtime.settings import OperatorSettings
from sft_operator.runtime.watch import start_watchers

PREFIX = "sft.dev"
FINALIZER = f"{PREFIX}/finalizer"
WATCH_SERVER_TIMEOUT = 300  # the API server ends each watch after this; Kopf reconnects
WATCH_CLIENT_TIMEOUT = 330  # a stalled watch (kopf#585, #957) is dropped after this
PRIME_TIMEOUT_SECONDS = 60


class NoDiffBase(kopf.DiffBaseStorage):
    """Kopf builds a diff base (a deep copy of the object) on every event, for change handlers. Only
    event watchers are registered here, so none is needed: profiling a burst showed that copy as
    a fifth of the operator's CPU."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        pass


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    try:
        await _configure(settings, memo, logger)
    except Exception as exc:  # a failed start-up must stop the operator, not be retried forever
        raise kopf.PermanentError(f"start-up failed: {exc}") from exc


async def _configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger) -> None:
    ours: OperatorSettings = memo.get("settings") or OperatorSettings()
    # Our own marks on our own API group, should Kopf ever store any (it does not: only event
    # watchers are registered, so no finalizer and no handler progress is written).
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.watching.server_timeout = WATCH_SERVER_TIMEOUT
    settings.watching.client_timeout = WATCH_CLIENT_TIMEOUT
    settings.watching.connect_timeout = 30
    # Kopf keeps one worker per object, holding its newest event, until the object is idle this long;
    # in a burst of 1,000 SFTJobs (5,000 objects) the default 5 s kept most of them alive at once.
    settings.batching.idle_timeout = 1.0
    # Events are ours alone (Context.post_event): Kopf posts none, not even for handler log lines.
    settings.posting.enabled = False

    ctx = Context(ours, KubeClient.from_kubeconfig(slots=ours.api_concurrency, timeout_seconds=ours.api_timeout_seconds),
                  ours.render_options())
    memo.ctx = ctx

    metrics.start_metrics_server(ours.metrics_port)
    logger.info("metrics on :%d/metrics, liveness on :%d/healthz", ours.metrics_port, ours.health_port)
    await progress_server.start_progress_server(ctx, logger)
    # The children and pods first: the first status derived after a restart sees the pods (a Running
    # job is never reported Pending for a moment), the first reconcile finds its children.
    watchers = start_watchers(ctx)
    try:
        await asyncio.wait_for(asyncio.gather(*(w.listed.wait() for w in watchers)), PRIME_TIMEOUT_SECONDS)
    except TimeoutError:
        logger.warning("the children's first lists took over %ds; going on, the watches will fill the cache",
                       PRIME_TIMEOUT_SECONDS)
    ctx.scheduler.spawn(resync_loop(ctx, ours.resync_seconds, max(1, round(ours.relist_seconds / ours.resync_seconds))),
                        name="resync")
    ctx.scheduler.spawn(watch_ca_file(ctx, ours.reload_seconds), name="progress CA")


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    """Kopf's watches log in as sft_operator.runtime.client does: in-cluster, else the kubeconfig."""
    return connection_info(load_credentials())


@kopf.on.cleanup()
async def shutdown(memo: kopf.Memo, **_: Any) -> None:
    ctx: Context | None = memo.get("ctx")
    await progress_server.stop_progress_server()
    if ctx is not None:
        await ctx.close()


@kopf.on.probe(id="sftjobs")
def sftjobs_known(memo: kopf.Memo, **_: Any) -> int:
    """Reported on /healthz: how many SFTJobs the operator is tracking."""
    ctx = memo.get("ctx")
    return len(ctx.cache.sftjobs) if ctx is not None else 0


@kopf.on.probe(id="apiStalledSeconds")
def api_calls_flow(memo: kopf.Memo, **_: Any) -> float:
    """Liveness fails (HTTP 500) when Kubernetes calls have waited too long with none finishing: every
    call has a timeout, so that means the operator is stuck, and a restart is the cure."""
    ctx = memo.get("ctx")
    if ctx is None:
        return 0.0
    stalled = ctx.kube.stalled_seconds()
    if stalled > ctx.settings.stuck_seconds:
        raise kopf.PermanentError(f"Kubernetes API calls have waited {stalled:.0f}s with none finishing "
                                  f"(limit {ctx.settings.stuck_seconds:.0f}s)")
    return round(stalled, 1)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def sftjob_event(event: dict[str, Any], body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    ctx: Context = memo.ctx
    if event.get("type") == "DELETED":
        uid = body["metadata"].get("uid")
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if (ctx.cache.sftjobs.get(key) or {}).get("metadata", {}).get("uid") in (uid, None):
            ctx.forget(key)
        return
    echo = ctx.cache.is_echo(body)  # our own status write: nothing to derive again
    key = ctx.cache.put("SFTJob", body)
    if key is None:
        return
    if not ctx.reconciler.converged(key):
        ctx.kick(key)
    if not echo:
        ctx.writer.mark(key)
