"""The operator process: `sft-operator` / `sftctl operator run` / `python -m sft_operator` (see ``__main__``).

This module parses the flags and runs Kopf; every Kopf registration lives in ``sft_operator.runtime.handlers``,
and every Kopf setting is made in its one startup handler, ``configure``.
A configuration that cannot work (no TLS for the progress endpoint, unreadable files) stops the
process before Kopf starts; anything else failing at start-up stops it too, with exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import kopf

from sft_operator import __version__
from sft_operator.runtime import handlers  # noqa: F401  (importing registers the handlers)
from sft_operator.runtime.settings import add_arguments, from_args

log = logging.getLogger("sft_operator")

EPILOG = """Every flag also reads an environment variable (shown in each help line).

Kubernetes credentials: in-cluster when run in a pod, otherwise $KUBECONFIG or ~/.kube/config.
Endpoints: /metrics on --metrics-port, /healthz on --health-port, progress on --progress-port.

examples:
  sft-operator --progress-allow-plaintext --progress-url http://127.0.0.1:8443   local development
  sft-operator -n team-a -n team-b --progress-tls-cert tls.crt --progress-tls-key tls.key
"""


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
