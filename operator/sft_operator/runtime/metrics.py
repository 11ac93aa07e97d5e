"""Prometheus metrics of the operator: one registry, one `sft_` prefix, base units, bounded labels.

The operator core calls the ``record_*``/``set_*`` functions; the progress endpoint calls
``set_job_metrics``. Per-job gauges carry ``{namespace, sftjob}`` and are removed by
``remove_job`` when a job finishes or is deleted, so their cardinality is bounded by the
number of active jobs. Every other label takes values from a small, fixed set (phase,
result, reason) or from namespaces (bounded by the cluster's tenancy).
"""

from __future__ import annotations

import re
import threading

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.metrics import MetricWrapperBase

from sft_contract.messages import ProgressReport
from sft_operator.api.types import Phase

PREFIX = "sft_"

# `*_created` timestamp series would double every counter and histogram (and read oddly as
# `sft_jobs_created_created`); nothing here needs them. Process-wide, like the operator.
disable_created_metrics()

# Our own registry: no process/platform collectors of the default one leak unprefixed names
# into what we promise to export, and tests can scrape exactly this.
REGISTRY = CollectorRegistry(auto_describe=True)

# A reason is one CamelCase word (API conventions). Anything else is folded into one value,
# so a free-form message can never explode the series count.
_REASON = re.compile(r"^[A-Z][A-Za-z0-9]{0,63}$")
OTHER_REASON = "Other"
_RESULTS = ("Succeeded", "Failed")

JOBS_CREATED = Counter(
    "sft_jobs_created",
    "SFTJobs the operator has seen created.",
    ["namespace"],
    registry=REGISTRY,
)
JOBS_FINISHED = Counter(
    "sft_jobs_finished",
    "SFTJobs that reached a terminal phase, by result (Succeeded/Failed) and reason.",
    ["namespace", "result", "reason"],
    registry=REGISTRY,
)
RECONCILE_ERRORS = Counter(
    "sft_reconcile_errors",
    "Reconcile runs that ended with an error (retried by the operator).",
    registry=REGISTRY,
)
RECONCILE_DURATION = Histogram(
    "sft_reconcile_duration_seconds",
    "Wall time of one reconcile of an SFTJob.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)
TIME_TO_RUNNING = Histogram(
    "sft_job_time_to_running_seconds",
    "Time from SFTJob creation until its trainer pods first ran (scheduling, queueing, image pull).",
    buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600),
    registry=REGISTRY,
)
JOB_DURATION = Histogram(
    "sft_job_duration_seconds",
    "Time from an SFTJob's start until it finished (either result).",
    buckets=(60, 300, 600, 1800, 3600, 7200, 14400, 28800, 57600, 86400, 172800, 604800),
    registry=REGISTRY,
)
JOBS = Gauge(
    "sft_jobs",
    "SFTJobs the operator currently knows, by phase.",
    ["phase"],
    registry=REGISTRY,
)
GPU_SECONDS = Counter(
    "sft_gpu_seconds",
    "GPU-seconds held by running trainer pods (GPUs requested x seconds running), for cost visibility.",
    ["namespace"],
    registry=REGISTRY,
)

_JOB_LABELS = ["namespace", "sftjob"]
JOB_TRAIN_LOSS = Gauge("sft_job_train_loss", "Latest training loss of a running SFTJob.", _JOB_LABELS, registry=REGISTRY)
JOB_EVAL_LOSS = Gauge(
    "sft_job_eval_loss", "Latest validation loss (response tokens) of a running SFTJob.", _JOB_LABELS, registry=REGISTRY
)
JOB_PROGRESS_RATIO = Gauge(
    "sft_job_progress_ratio", "Completed fraction (0..1) of a running SFTJob's steps.", _JOB_LABELS, registry=REGISTRY
)
JOB_TOKENS_PER_SECOND = Gauge(
    "sft_job_tokens_per_second",
    "Trained (non-padding) tokens per second of a running SFTJob.",
    _JOB_LABELS,
    registry=REGISTRY,
)
JOB_LEARNING_RATE = Gauge(
    "sft_job_learning_rate", "Current learning rate of a running SFTJob.", _JOB_LABELS, registry=REGISTRY
)
# Set when a job's gates are judged and kept after it ends (the verdict outlives the run), removed with the SFTJob.
JOB_EVALUATION_PASSED = Gauge(
    "sft_job_evaluation_passed",
    "1 when every evaluation gate of an SFTJob passed, 0 when one failed (jobs with spec.evaluation.gates).",
    _JOB_LABELS,
    registry=REGISTRY,
)
PER_JOB_GAUGES: tuple[Gauge, ...] = (
    JOB_TRAIN_LOSS,
    JOB_EVAL_LOSS,
    JOB_PROGRESS_RATIO,
    JOB_TOKENS_PER_SECOND,
    JOB_LEARNING_RATE,
)

ALL_METRICS: tuple[MetricWrapperBase, ...] = (
    JOBS_CREATED,
    JOBS_FINISHED,
    RECONCILE_ERRORS,
    RECONCILE_DURATION,
    TIME_TO_RUNNING,
    JOB_DURATION,
    JOBS,
    GPU_SECONDS,
    *PER_JOB_GAUGES,
    JOB_EVALUATION_PASSED,
)

_lock = threading.Lock()
_server_started: set[int] = set()
_extra_phases: set[str] = set()


def metric_names() -> set[str]:
    """Every series name this module exports, as a scrape shows it (with `_total`, `_bucket`, ...)."""
    names: set[str] = set()
    for metric in ALL_METRICS:
        base = metric._name  # prometheus-client strips `_total` from counter names
        kind = metric._type
        if kind == "counter":
            names.add(f"{base}_total")
        elif kind == "histogram":
            names.update({f"{base}_bucket", f"{base}_sum", f"{base}_count"})
        else:
            names.add(base)
    return names


def start_metrics_server(port: int) -> None:
    """Serve `/metrics` (this registry only) on `port` in a daemon thread; idempotent per port."""
    with _lock:
        if port in _server_started:
            return
        start_http_server(port, registry=REGISTRY)
        _server_started.add(port)


def _reason(reason: str | None) -> str:
    return reason if reason and _REASON.match(reason) else OTHER_REASON


def _result(result: str) -> str:
    return result if result in _RESULTS else OTHER_REASON


def record_created(namespace: str) -> None:
    JOBS_CREATED.labels(namespace=namespace).inc()


def record_finished(namespace: str, result: str, reason: str, duration_seconds: float | None) -> None:
    JOBS_FINISHED.labels(namespace=namespace, result=_result(result), reason=_reason(reason)).inc()
    if duration_seconds is not None and duration_seconds >= 0:
        JOB_DURATION.observe(duration_seconds)


def record_running(namespace: str, seconds_since_creation: float) -> None:
    # Unlabelled on purpose: a namespace label would multiply the bucket series by tenants.
    if seconds_since_creation >= 0:
        TIME_TO_RUNNING.observe(seconds_since_creation)


def observe_reconcile(seconds: float) -> None:
    RECONCILE_DURATION.observe(max(0.0, seconds))


def record_reconcile_error() -> None:
    RECONCILE_ERRORS.inc()


def set_phase_counts(counts: dict[str, int]) -> None:
    """Replace the per-phase job counts; every known phase is exported, absent ones as 0."""
    with _lock:
        known = {p.value for p in Phase}
        for phase in known:
            JOBS.labels(phase=phase).set(counts.get(phase, 0))
        extra = {p for p in counts if p not in known}
        for phase in _extra_phases - extra:
            try:
                JOBS.remove(phase)
            except KeyError:
                pass
        for phase in extra:
            JOBS.labels(phase=phase).set(counts[phase])
        _extra_phases.clear()
        _extra_phases.update(extra)


def add_gpu_seconds(namespace: str, seconds: float) -> None:
    if seconds > 0:
        GPU_SECONDS.labels(namespace=namespace).inc(seconds)


def set_job_metrics(namespace: str, name: str, report: ProgressReport) -> None:
    """Export a running job's latest progress; values the report lacks keep their last value."""
    values = {
        JOB_TRAIN_LOSS: report.train_loss,
        JOB_EVAL_LOSS: report.eval_loss,
        JOB_LEARNING_RATE: report.learning_rate,
        JOB_TOKENS_PER_SECOND: report.tokens_per_second,
        JOB_PROGRESS_RATIO: min(1.0, report.step / report.total_steps) if report.total_steps > 0 else None,
    }
    for gauge, value in values.items():
        if value is not None:
            gauge.labels(namespace=namespace, sftjob=name).set(value)


def set_evaluation_passed(namespace: str, name: str, passed: bool) -> None:
    JOB_EVALUATION_PASSED.labels(namespace=namespace, sftjob=name).set(1.0 if passed else 0.0)


def remove_job(namespace: str, name: str, *, deleted: bool = False) -> None:
    """Drop the per-job series of `namespace/name`: the running job's when it ended, all once it is deleted."""
    for gauge in (*PER_JOB_GAUGES, JOB_EVALUATION_PASSED) if deleted else PER_JOB_GAUGES:
        try:
            gauge.remove(namespace, name)
        except KeyError:
            pass
