"""Operator settings: one frozen object, read from flags or SFT_* environment variables.

``from_args`` also checks what would otherwise fail only after start-up (TLS files, the CA file),
so a misconfigured operator exits at once with the reason instead of looking alive.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from pydantic import ValidationError

from sft_operator.api.types import PlatformDefaults
from sft_operator.core.render import RenderOptions

DEFAULT_TRAINER_IMAGE = RenderOptions.default_image
DEFAULT_TOKEN_AUDIENCE = RenderOptions.token_audience


@dataclass(frozen=True)
class OperatorSettings:
    namespaces: tuple[str, ...] = ()  # empty: all namespaces
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    # The platform's defaults for what an SFTJob leaves out (the chart's trainer.defaults).
    trainer_defaults: PlatformDefaults = field(default_factory=PlatformDefaults)
    metrics_port: int = 8080
    health_port: int = 8081
    progress_port: int = 8443
    progress_url: str | None = None  # what trainer pods call, e.g. https://sft-operator.sft-system.svc:8443
    progress_tls_cert: str | None = None
    progress_tls_key: str | None = None
    progress_ca_file: str | None = None  # CA bundle handed to trainer pods (ConfigMap key ca.crt)
    progress_allow_plaintext: bool = False  # local development only
    token_audience: str = DEFAULT_TOKEN_AUDIENCE
    # TokenReviews one source address may cause at the progress endpoint: a burst, then this rate (429 beyond)
    progress_source_reviews_per_second: float = 1.0
    progress_source_review_burst: int = 10
    # A start problem (an image pull, container config or volume failing) lasting this long fails the job. Each is
    # timed from when it began: 900 s lets our 6.6 GB trainer image be pulled again after one transient error (5
    # minutes at ~22 MB/s, plus back-off), and a Multi-Attach wait out the 6-minute force-detach after a node loss.
    pod_start_grace_seconds: int = 900
    progress_min_interval_seconds: float = 2.0  # at most one progress write per job per interval
    status_window_seconds: float = 0.5  # changes within this window become one status write
    resync_seconds: float = 30.0  # reconcile and re-derive every SFTJob this often
    relist_seconds: float = 300.0  # list everything this often to catch deletions a watch missed
    reload_seconds: float = 60.0  # re-read the TLS certificate and the progress CA this often
    api_timeout_seconds: float = 30.0  # every Kubernetes call
    api_concurrency: int = 16  # Kubernetes calls in flight
    stuck_seconds: float = 120.0  # liveness fails when Kubernetes calls wait this long with none finishing

    def render_options(self) -> RenderOptions:
        ca = None
        if self.progress_ca_file:
            with open(self.progress_ca_file) as handle:
                ca = handle.read()
        return RenderOptions(
            default_image=self.trainer_image,
            defaults=self.trainer_defaults,
            progress_base_url=self.progress_url,
            progress_ca_pem=ca,
            token_audience=self.token_audience,
        )

    def problems(self) -> list[str]:
        """What keeps this configuration from working, for a person to fix before start."""
        out = []
        if (self.progress_tls_cert is None) != (self.progress_tls_key is None):
            out.append("--progress-tls-cert and --progress-tls-key go together")
        elif self.progress_tls_cert is None and not self.progress_allow_plaintext:
            out.append("the progress endpoint needs --progress-tls-cert and --progress-tls-key "
                       "(or --progress-allow-plaintext, for local development only)")
        if self.progress_source_reviews_per_second <= 0 or self.progress_source_review_burst < 1:
            out.append("--progress-source-reviews-per-second must be above 0 and --progress-source-review-burst "
                       "at least 1")
        for flag, path in (("--progress-tls-cert", self.progress_tls_cert), ("--progress-tls-key", self.progress_tls_key),
                           ("--progress-ca-file", self.progress_ca_file)):
            if path is not None and not os.access(path, os.R_OK):
                out.append(f"{flag} {path}: not a readable file")
        return out


def _env_bool(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _trainer_defaults(text: str) -> PlatformDefaults:
    """--trainer-defaults: checked at start, so a bad value stops the operator with the field named."""
    try:
        defaults = PlatformDefaults.model_validate_json(text or "{}")
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors())
        raise argparse.ArgumentTypeError(f"--trainer-defaults / SFT_TRAINER_DEFAULTS: {problems}") from None
    if defaults.image:
        raise argparse.ArgumentTypeError("--trainer-defaults / SFT_TRAINER_DEFAULTS: image: set --trainer-image")
    return defaults


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument(
        "-n",
        "--namespace",
        action="append",
        dest="namespaces",
        default=[n for n in env("SFT_WATCH_NAMESPACES", "").split(",") if n],
        help="namespace to watch; repeat for several (env SFT_WATCH_NAMESPACES, comma-separated; default: all)",
    )
    parser.add_argument("--trainer-image", default=env("SFT_TRAINER_IMAGE", DEFAULT_TRAINER_IMAGE),
                        help="default trainer image (env SFT_TRAINER_IMAGE)")
    parser.add_argument("--trainer-defaults", type=_trainer_defaults,
                        default=env("SFT_TRAINER_DEFAULTS", "{}"),
                        help="JSON defaults for what an SFTJob leaves out: nodeSelector, tolerations, "
                             "priorityClassName, cache.storageClassName, cache.size (env SFT_TRAINER_DEFAULTS)")
    parser.add_argument("--metrics-port", type=int, default=int(env("SFT_METRICS_PORT", "8080")),
                        help="Prometheus /metrics port (env SFT_METRICS_PORT)")
    parser.add_argument("--health-port", type=int, default=int(env("SFT_HEALTH_PORT", "8081")),
                        help="liveness /healthz port (env SFT_HEALTH_PORT)")
    parser.add_argument("--progress-port", type=int, default=int(env("SFT_PROGRESS_PORT", "8443")),
                        help="progress endpoint port (env SFT_PROGRESS_PORT)")
    parser.add_argument("--progress-url", default=env("SFT_PROGRESS_URL"),
                        help="progress endpoint URL as trainer pods reach it (env SFT_PROGRESS_URL)")
    parser.add_argument("--progress-tls-cert", default=env("SFT_PROGRESS_TLS_CERT"),
                        help="TLS certificate file for the progress endpoint (env SFT_PROGRESS_TLS_CERT)")
    parser.add_argument("--progress-tls-key", default=env("SFT_PROGRESS_TLS_KEY"),
                        help="TLS key file for the progress endpoint (env SFT_PROGRESS_TLS_KEY)")
    parser.add_argument("--progress-ca-file", default=env("SFT_PROGRESS_CA_FILE"),
                        help="CA bundle trainer pods use to verify the endpoint (env SFT_PROGRESS_CA_FILE)")
    parser.add_argument("--progress-allow-plaintext", action="store_true",
                        default=_env_bool(env("SFT_PROGRESS_ALLOW_PLAINTEXT")),
                        help="serve progress over plain HTTP; local development only (env SFT_PROGRESS_ALLOW_PLAINTEXT)")
    parser.add_argument("--token-audience", default=env("SFT_TOKEN_AUDIENCE", DEFAULT_TOKEN_AUDIENCE),
                        help="audience of trainer pods' projected tokens (env SFT_TOKEN_AUDIENCE)")
    parser.add_argument("--progress-source-reviews-per-second", type=float,
                        default=float(env("SFT_PROGRESS_SOURCE_REVIEWS_PER_SECOND", "1")),
                        help="TokenReviews one source address may cause at the progress endpoint per second, after "
                             "its burst; beyond, 429 (env SFT_PROGRESS_SOURCE_REVIEWS_PER_SECOND)")
    parser.add_argument("--progress-source-review-burst", type=int,
                        default=int(env("SFT_PROGRESS_SOURCE_REVIEW_BURST", "10")),
                        help="TokenReviews one source address may cause at once (env SFT_PROGRESS_SOURCE_REVIEW_BURST)")
    parser.add_argument("--pod-start-grace-seconds", type=int,
                        dest="pod_start_grace_seconds",
                        default=int(env("SFT_POD_START_GRACE_SECONDS", env("SFT_IMAGE_PULL_GRACE_SECONDS", "900"))),
                        help="how long one start problem of a trainer pod (image pull, container config, volume "
                             "attach or mount) may last, from when it began, before the job fails "
                             "(env SFT_POD_START_GRACE_SECONDS)")
    parser.add_argument("--resync-seconds", type=float, default=float(env("SFT_RESYNC_SECONDS", "30")),
                        help="reconcile every SFTJob this often, a safety net for missed events (env SFT_RESYNC_SECONDS)")
    parser.add_argument("--relist-seconds", type=float, default=float(env("SFT_RELIST_SECONDS", "300")),
                        help="list everything this often to drop objects whose deletion a watch missed "
                             "(env SFT_RELIST_SECONDS)")
    parser.add_argument("--reload-seconds", type=float, default=float(env("SFT_RELOAD_SECONDS", "60")),
                        help="re-read the TLS certificate and the progress CA this often (env SFT_RELOAD_SECONDS)")
    parser.add_argument("--api-timeout-seconds", type=float, default=float(env("SFT_API_TIMEOUT_SECONDS", "30")),
                        help="timeout of every Kubernetes API call (env SFT_API_TIMEOUT_SECONDS)")
    parser.add_argument("--api-concurrency", type=int, default=int(env("SFT_API_CONCURRENCY", "16")),
                        help="Kubernetes API calls in flight at once (env SFT_API_CONCURRENCY)")


def from_args(args: argparse.Namespace) -> OperatorSettings:
    settings = OperatorSettings(
        namespaces=tuple(dict.fromkeys(args.namespaces)),
        trainer_image=args.trainer_image,
        trainer_defaults=args.trainer_defaults,
        metrics_port=args.metrics_port,
        health_port=args.health_port,
        progress_port=args.progress_port,
        progress_url=args.progress_url,
        progress_tls_cert=args.progress_tls_cert,
        progress_tls_key=args.progress_tls_key,
        progress_ca_file=args.progress_ca_file,
        progress_allow_plaintext=args.progress_allow_plaintext,
        token_audience=args.token_audience,
        progress_source_reviews_per_second=args.progress_source_reviews_per_second,
        progress_source_review_burst=args.progress_source_review_burst,
        pod_start_grace_seconds=args.pod_start_grace_seconds,
        resync_seconds=args.resync_seconds,
        relist_seconds=args.relist_seconds,
        reload_seconds=args.reload_seconds,
        api_timeout_seconds=args.api_timeout_seconds,
        api_concurrency=args.api_concurrency,
    )
    problems = settings.problems()
    if problems:
        raise SystemExit("sft-operator: " + "; ".join(problems))
    return settings
