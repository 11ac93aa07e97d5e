"""The operator's entry point: `sft-operator` / `sftctl operator run` / `python -m sft_operator.main`.

This module only configures and runs Kopf; the handlers live in ``sft_operator.handlers``
(crate-operator layout). Every Kopf setting is made in the one startup handler, ``configure``.
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
from .handlers.handle_lifecycle import prime, resync_loop
from .handlers.kube import Kube, api_client
from .handlers.state import ClusterState
from .render import LABEL_JOB
from .settings import OperatorSettings, add_arguments, from_args

PREFIX = "sft.dev"
FINALIZER = f"{PREFIX}/finalizer"
WATCH_SERVER_TIMEOUT = 300  # the API server ends each watch after this; Kopf reconnects
WATCH_CLIENT_TIMEOUT = 330  # a stalled watch (kopf#585, #957) is dropped after this
log = logging.getLogger("sft_operator")

EPILOG = """Every flag also reads an environment variable (shown in each help line).

Kubernetes credentials: in-cluster when run in a pod, otherwise $KUBECONFIG or ~/.kube/config.
Endpoints: /metrics on --metrics-port, /healthz on --health-port, progress on --progress-port.

examples:
  sft-operator --progress-allow-plaintext --progress-url http://127.0.0.1:8443   local development
  sft-operator -n team-a -n team-b --progress-tls-cert tls.crt --progress-tls-key tls.key
"""


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    ours: OperatorSettings = memo.get("settings") or OperatorSettings()
    # Our own marks on our own API group: nothing of Kopf's lands in status or under kopf.zalando.org.
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration"
    )
    settings.watching.server_timeout = WATCH_SERVER_TIMEOUT
    settings.watching.client_timeout = WATCH_CLIENT_TIMEOUT
    settings.watching.connect_timeout = 30
    # Server-side selectors: stream only the Jobs and pods the renderer labelled.
    settings.watching.label_selectors["batch", "v1", "jobs"] = LABEL_JOB
    settings.watching.label_selectors["v1", "pods"] = LABEL_JOB
    # Events: ours (kopf.event) always; handler log lines only from warnings up.
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = "sft-operator"
    settings.execution.max_workers = 32  # blocking Kubernetes calls run in threads

    memo.settings = ours
    memo.kube = Kube(api_client())
    memo.state = ClusterState()
    memo.render_options = ours.render_options()

    try:
        from . import metrics
    except ImportError as exc:
        raise kopf.PermanentError(f"sft_operator.metrics is missing ({exc}); /metrics cannot start") from exc
    metrics.start_metrics_server(ours.metrics_port)
    logger.info("metrics on :%d/metrics, liveness on :%d/healthz", ours.metrics_port, ours.health_port)
    try:
        from . import progress
    except ImportError as exc:
        raise kopf.PermanentError(f"sft_operator.progress is missing ({exc}); the progress endpoint cannot start") from exc
    await progress.start_progress_server(ours, logger)

    await prime(memo)
    memo.resync = memo.state.spawn(resync_loop(memo))


@kopf.on.cleanup()
async def shutdown(memo: kopf.Memo, **_: Any) -> None:
    state: ClusterState | None = memo.get("state")
    if state is not None:
        for task in list(state.tasks):
            task.cancel()
    try:
        from .progress import stop_progress_server
    except ImportError:
        return
    await stop_progress_server()


@kopf.on.probe(id="sftjobs")
def sftjobs_known(memo: kopf.Memo, **_: Any) -> int:
    """Reported on /healthz: how many SFTJobs the operator is tracking."""
    state = memo.get("state")
    return len(state.sftjobs) if state is not None else 0


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
    settings = from_args(args)
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
    return 0


def run() -> None:
    sys.exit(run_from_cli(sys.argv[1:]))


if __name__ == "__main__":
    run()
