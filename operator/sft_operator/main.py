"""The operator: `sft-operator` / `sftctl operator run` / `python -m sft_operator` (see ``__main__``).

This module only configures and runs Kopf; the handlers live in ``sft_operator.handlers``
(crate-operator layout). Every Kopf setting is made in the one startup handler, ``configure``.
A configuration that cannot work (no TLS for the progress endpoint, unreadable files) stops the
process before Kopf starts; anything else failing at start-up stops it too, with exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

import kopf

from . import __version__
from . import handlers  # noqa: F401  (registers the handlers)
from .context import Context
from .handlers.handle_lifecycle import resync_loop, watch_ca_file
from .kube import KubeClient, connection_info, load_credentials
from .watch import start_watchers
from .settings import OperatorSettings, add_arguments, from_args

PREFIX = "sft.dev"
FINALIZER = f"{PREFIX}/finalizer"
WATCH_SERVER_TIMEOUT = 300  # the API server ends each watch after this; Kopf reconnects
WATCH_CLIENT_TIMEOUT = 330  # a stalled watch (kopf#585, #957) is dropped after this
PRIME_TIMEOUT_SECONDS = 60
log = logging.getLogger("sft_operator")

EPILOG = """Every flag also reads an environment variable (shown in each help line).

Kubernetes credentials: in-cluster when run in a pod, otherwise $KUBECONFIG or ~/.kube/config.
Endpoints: /metrics on --metrics-port, /healthz on --health-port, progress on --progress-port.

examples:
  sft-operator --progress-allow-plaintext --progress-url http://127.0.0.1:8443   local development
  sft-operator -n team-a -n team-b --progress-tls-cert tls.crt --progress-tls-key tls.key
"""


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

    from . import metrics, progress

    metrics.start_metrics_server(ours.metrics_port)
    logger.info("metrics on :%d/metrics, liveness on :%d/healthz", ours.metrics_port, ours.health_port)
    await progress.start_progress_server(ctx, logger)
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
    """Kopf's watches log in as sft_operator.kube does: in-cluster, else the kubeconfig."""
    return connection_info(load_credentials())


@kopf.on.cleanup()
async def shutdown(memo: kopf.Memo, **_: Any) -> None:
    ctx: Context | None = memo.get("ctx")
    from .progress import stop_progress_server

    await stop_progress_server()
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sft-operator",
        description="Run the SFT operator: reconcile SFTJobs (sft.dev/v1alpha1) into trainer Jobs, "
        "derive their status, serve the trainer progress endpoint and Prometheus metrics.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sft-operator {__version__}")
    add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every handler run (Kopf's verbose mode)")
    parser.add_argument("--debug", action="store_true", help="log everything, including Kopf internals")
    parser.add_argument(
        "--log-format", choices=["plain", "full", "json"], default="full", help="log line format (default: full)"
    )
    return parser


def run_from_cli(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    settings = from_args(args)  # exits with the reason when the configuration cannot work
    kopf.configure(
        debug=args.debug,
        verbose=args.verbose,
        log_format={"plain": kopf.LogFormat.PLAIN, "full": kopf.LogFormat.FULL, "json": kopf.LogFormat.JSON}[
            args.log_format
        ],
    )
    if not (args.verbose or args.debug):
        # Our own loggers (sft_operator.*) report every phase change; Kopf's per-event
        # "Handler ... succeeded" lines and the probe's access log would drown them.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    scope = ", ".join(settings.namespaces) if settings.namespaces else "all namespaces"
    log.info("sft-operator %s watching %s", __version__, scope)
    try:
        kopf.run(
            standalone=True,  # one replica (Recreate); peering is not leader election
            clusterwide=not settings.namespaces,
            namespaces=list(settings.namespaces),
            liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz",
            memo=kopf.Memo(settings=settings),
        )
    except KeyboardInterrupt:
        return 130
    except asyncio.CancelledError:
        return 1
    except Exception as exc:  # e.g. kopf's ActivityError: start-up failed for good
        cause = exc.__cause__ or exc
        log.error("sft-operator stopped: %s", cause)
        return 1
    return 0


def run() -> None:
    sys.exit(run_from_cli(sys.argv[1:]))


if __name__ == "__main__":
    run()
