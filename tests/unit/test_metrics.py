"""The operator's Prometheus metrics: naming conventions, bounded labels, per-job cleanup, scraping."""

from __future__ import annotations

import re
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sft_operator.runtime import metrics
from sft_contract.messages import ProgressReport
from support import free_port


def _samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client import generate_latest

    text = generate_latest(metrics.REGISTRY).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(name: str, **labels: str) -> float | None:
    return _samples().get((name, tuple(sorted(labels.items()))))


def _series_names() -> set[str]:
    return {name for name, _ in _samples()}


def test_every_exported_name_follows_prometheus_naming():
    names = metrics.metric_names()
    assert names, "metric_names() lists nothing"
    for name in names:
        assert name.startswith("sft_"), name
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name
        assert not re.search(r"_(ms|milliseconds|minutes|hours|bytes_kb)(_|$)", name), f"non-base unit: {name}"
    for metric in metrics.ALL_METRICS:
        if metric._type == "counter":
            assert f"{metric._name}_total" in names
            assert metric._name not in names
        if metric._type == "histogram":
            assert metric._name.endswith("_seconds"), f"durations are in seconds: {metric._name}"


def test_metric_names_matches_what_a_scrape_shows():
    metrics.record_created("ns-names")
    metrics.record_finished("ns-names", "Succeeded", "Completed", 12.0)
    metrics.record_running("ns-names", 3.0)
    metrics.observe_reconcile(0.01)
    metrics.record_reconcile_error()
    metrics.set_phase_counts({"Running": 1})
    metrics.add_gpu_seconds("ns-names", 8.0)
    metrics.set_job_metrics("ns-names", "job", ProgressReport(step=1, total_steps=2, epoch=0.5, train_loss=1.0,
                                                              eval_loss=1.1, learning_rate=2e-5,
                                                              tokens_per_second=100.0))
    metrics.set_evaluation_passed("ns-names", "job", True)
    try:
        scraped = _series_names()
        assert scraped == metrics.metric_names()
        assert not any(name.endswith("_created") for name in scraped)
    finally:
        metrics.remove_job("ns-names", "job", deleted=True)


def test_issue_metrics_are_all_there():
    expected = {
        "sft_jobs_created_total",
        "sft_jobs_finished_total",
        "sft_reconcile_errors_total",
        "sft_reconcile_duration_seconds_bucket",
        "sft_job_time_to_running_seconds_bucket",
        "sft_job_duration_seconds_bucket",
        "sft_jobs",
        "sft_gpu_seconds_total",
        "sft_job_train_loss",
        "sft_job_eval_loss",
        "sft_job_progress_ratio",
        "sft_job_tokens_per_second",
        "sft_job_learning_rate",
    }
    assert expected <= metrics.metric_names()


def test_counters_and_histograms_count():
    before = _value("sft_jobs_created_total", namespace="ns-count") or 0.0
    metrics.record_created("ns-count")
    metrics.record_created("ns-count")
    assert _value("sft_jobs_created_total", namespace="ns-count") == before + 2

    count_before = _value("sft_job_duration_seconds_count") or 0.0
    metrics.record_finished("ns-count", "Failed", "OOMKilled", 90.0)
    metrics.record_finished("ns-count", "Failed", "OOMKilled", None)  # no start time: counted, not observed
    assert _value("sft_jobs_finished_total", namespace="ns-count", result="Failed", reason="OOMKilled") == 2
    assert _value("sft_job_duration_seconds_count") == count_before + 1

    gpu_before = _value("sft_gpu_seconds_total", namespace="ns-count") or 0.0
    metrics.add_gpu_seconds("ns-count", 16.0)
    metrics.add_gpu_seconds("ns-count", -5.0)  # never decreases a counter
    assert _value("sft_gpu_seconds_total", namespace="ns-count") == gpu_before + 16.0


def test_free_form_reasons_and_results_are_folded_to_bound_cardinality():
    metrics.record_finished("ns-bound", "Failed", "the pod said: out of memory at step 17", None)
    metrics.record_finished("ns-bound", "Weird", "", None)
    assert _value("sft_jobs_finished_total", namespace="ns-bound", result="Failed", reason="Other") == 1
    assert _value("sft_jobs_finished_total", namespace="ns-bound", result="Other", reason="Other") == 1


def test_phase_gauge_is_replaced_not_accumulated():
    metrics.set_phase_counts({"Running": 3, "Pending": 2})
    assert _value("sft_jobs", phase="Running") == 3
    metrics.set_phase_counts({"Succeeded": 5})
    assert _value("sft_jobs", phase="Running") == 0
    assert _value("sft_jobs", phase="Pending") == 0
    assert _value("sft_jobs", phase="Succeeded") == 5
    metrics.set_phase_counts({"Mystery": 1})
    assert _value("sft_jobs", phase="Mystery") == 1
    metrics.set_phase_counts({})
    assert _value("sft_jobs", phase="Mystery") is None


def test_per_job_gauges_follow_reports_and_are_removed():
    report = ProgressReport(step=25, total_steps=100, epoch=1.0, train_loss=1.5, learning_rate=2e-5,
                            tokens_per_second=1234.0)
    metrics.set_job_metrics("team-a", "llama", report)
    metrics.set_job_metrics("team-a", "other", report)
    assert _value("sft_job_train_loss", namespace="team-a", sftjob="llama") == 1.5
    assert _value("sft_job_progress_ratio", namespace="team-a", sftjob="llama") == 0.25
    assert _value("sft_job_tokens_per_second", namespace="team-a", sftjob="llama") == 1234.0
    assert _value("sft_job_learning_rate", namespace="team-a", sftjob="llama") == 2e-5
    assert _value("sft_job_eval_loss", namespace="team-a", sftjob="llama") is None  # no eval yet

    # A later report without eval keeps the last eval loss; one with it updates it.
    metrics.set_job_metrics("team-a", "llama", ProgressReport(step=50, total_steps=100, epoch=2, eval_loss=1.2))
    metrics.set_job_metrics("team-a", "llama", ProgressReport(step=60, total_steps=100, epoch=2.4))
    assert _value("sft_job_eval_loss", namespace="team-a", sftjob="llama") == 1.2
    assert _value("sft_job_train_loss", namespace="team-a", sftjob="llama") == 1.5
    assert _value("sft_job_progress_ratio", namespace="team-a", sftjob="llama") == 0.6

    metrics.remove_job("team-a", "llama")
    remaining = [key for key in _samples() if ("sftjob", "llama") in key[1]]
    assert remaining == []
    assert _value("sft_job_train_loss", namespace="team-a", sftjob="other") == 1.5  # others untouched
    metrics.remove_job("team-a", "llama")  # idempotent
    metrics.remove_job("team-a", "other")
    assert not [key for key in _samples() if ("namespace", "team-a") in key[1] and key[0].startswith("sft_job_")]


def test_per_job_cardinality_is_bounded_by_active_jobs():
    for i in range(200):
        metrics.set_job_metrics("churn", f"job-{i}", ProgressReport(step=1, total_steps=2, epoch=0, train_loss=1.0))
        metrics.remove_job("churn", f"job-{i}")
    assert not [key for key in _samples() if ("namespace", "churn") in key[1]]


def test_metrics_endpoint_serves_our_registry():
    port = free_port()
    metrics.start_metrics_server(port)
    metrics.start_metrics_server(port)  # idempotent: a second call does not try to bind again
    metrics.set_job_metrics("scrape", "job", ProgressReport(step=3, total_steps=4, epoch=0, train_loss=0.75))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            assert response.status == 200
            body = response.read().decode()
        assert 'sft_job_train_loss{namespace="scrape",sftjob="job"} 0.75' in body
        assert "sft_jobs_created_total" in body
        # Only our registry: no default process/python collectors without our prefix.
        families = {f.name for f in text_string_to_metric_families(body)}
        assert all(name.startswith("sft_") for name in families), families
    finally:
        metrics.remove_job("scrape", "job")


@pytest.mark.parametrize("value", [0.0, 5.0])
def test_time_to_running_and_reconcile_histograms_observe(value):
    before = _value("sft_job_time_to_running_seconds_count") or 0.0
    metrics.record_running("ns-h", value)
    assert _value("sft_job_time_to_running_seconds_count") == before + 1
    before = _value("sft_reconcile_duration_seconds_count") or 0.0
    metrics.observe_reconcile(value / 100)
    assert _value("sft_reconcile_duration_seconds_count") == before + 1
