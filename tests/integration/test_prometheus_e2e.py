"""A real Prometheus server against the operator on the real node: what a platform team's monitoring sees.

The chart is installed once (test_end_to_end's `installed`, its own release for this module). A
Prometheus server (built from its Go module, scripts/prometheus-bin.sh) runs on the host with a
configuration generated from the chart's rendered ServiceMonitor the way the Prometheus Operator
generates one (tests/integration/prometheus_server.py): Kubernetes endpoints discovery in its
namespaces through the API server, relabelling that keeps the Service its selector matches and the
endpoint port it names, its path, scheme, interval and honorLabels. Its rule file is the chart's
rendered PrometheusRule. The host reaches the pod IPs on the node's bridge, so Prometheus scrapes the
pod the Service's endpoints list, as an in-cluster Prometheus would.

Shorter than the chart's defaults, so that a test need not wait: the scrape and evaluation interval
(2 s, `prometheus.serviceMonitor.interval`) and the operator's resync (`operator.extraArgs:
[--resync-seconds=2]`), which is when it adds up GPU-seconds. The alert rules are the chart's
as rendered; `SFTJobFailed` has no `for:` to shorten.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass

import pytest
import yaml
from kubernetes import client

from dashboard_queries import queries as dashboard_queries

from .prometheus_server import Prometheus, rule_file, scrape_config
from .test_end_to_end import Installed, Run, installed  # noqa: F401  (the module's helm release)
from .test_helm_install import CHART

pytestmark = [pytest.mark.cluster, pytest.mark.images, pytest.mark.trainer, pytest.mark.slow]

INTERVAL_SECONDS = 2
RESYNC_SECONDS = 2
RELEASE_VALUES = {  # of this module's `installed` release
    "operator": {"extraArgs": [f"--resync-seconds={RESYNC_SECONDS}"]},
    "prometheus": {"serviceMonitor": {"interval": f"{INTERVAL_SECONDS}s", "scrapeTimeout": f"{INTERVAL_SECONDS}s"}},
}


def render_monitoring(installed: Installed) -> tuple[dict, dict]:
    """The release's ServiceMonitor and PrometheusRule, as `helm template` renders them with the monitoring
    assets enabled (the cluster has no monitoring.coreos.com CRDs to install them into)."""
    release = installed.release
    server = json.loads(installed.cluster.kubectl("version", "-o", "json").stdout)["serverVersion"]["gitVersion"]
    values = copy.deepcopy(RELEASE_VALUES)
    values["prometheus"]["serviceMonitor"]["enabled"] = True
    values["prometheus"]["rules"] = {"enabled": True}
    out = release.helm("template", release.name, str(CHART), "--kube-version", server.lstrip("v").split("+")[0],
                       "--show-only", "templates/servicemonitor.yaml", "--show-only", "templates/prometheusrule.yaml",
                       values=values).stdout
    docs = {d["kind"]: d for d in yaml.safe_load_all(out) if d}
    return docs["ServiceMonitor"], docs["PrometheusRule"]


@pytest.fixture(scope="module")
def prometheus(installed, tmp_path_factory):  # noqa: F811
    service_monitor, rule = render_monitoring(installed)
    job = scrape_config(service_monitor, installed.cluster.kubeconfig)
    config = {"global": {"scrape_interval": f"{INTERVAL_SECONDS}s", "evaluation_interval": f"{INTERVAL_SECONDS}s"},
              "scrape_configs": [job]}
    server = Prometheus(tmp_path_factory.mktemp("prometheus"), config, rule_file(rule))
    try:
        server.start()
        server.started = time.time()
        yield server
    finally:
        server.stop()
        print(f"--- prometheus log ---\n{server.log_tail()}")  # shown when a test failed


def value(result: list[dict]) -> float | None:
    """The one sample of an instant query, or None when it has no series."""
    assert len(result) <= 1, result
    return float(result[0]["value"][1]) if result else None


def settled(prometheus: Prometheus, expr: str, timeout: float = 60) -> float:
    """The value of ``expr`` once it stays put across two operator resyncs and two scrapes (0 while absent)."""
    pause = 2 * (RESYNC_SECONDS + INTERVAL_SECONDS)
    deadline = time.monotonic() + timeout
    last = value(prometheus.query(expr)) or 0.0
    while time.monotonic() < deadline:
        time.sleep(pause)
        now = value(prometheus.query(expr)) or 0.0
        if now == last:
            return now
        last = now
    raise AssertionError(f"{expr} still changing after {timeout} s (last {last})")


@dataclass
class GpuJob:
    run: Run
    gpu_seconds: float  # what sft_gpu_seconds_total of the namespace grew by while it ran


@pytest.fixture(scope="module")
def gpu_job(installed, prometheus, tmp_path_factory) -> GpuJob:  # noqa: F811
    """A 2-pod SFTJob, 1 GPU each (the node advertises 8 fake ones), trained to its end."""
    counter = f'sft_gpu_seconds_total{{namespace="{installed.work}"}}'
    before = settled(prometheus, counter)
    name = "two-gpus"
    # Most of a minute Running (DDP on 2 cores), with an evaluation half-way so that eval loss is reported.
    applied = installed.apply(name, tmp_path_factory.mktemp(name), resources={"nodes": 2},
                              hyperparameters={"maxSteps": 100}, evaluation={"strategy": "steps", "steps": 50})
    run = installed.follow(name, applied)
    assert run.status.get("phase") == "Succeeded", installed.explain(name, run.status)
    return GpuJob(run, settled(prometheus, counter) - before)


@pytest.fixture(scope="module")
def failed_job(installed, prometheus, tmp_path_factory) -> tuple[Run, list]:  # noqa: F811
    """An SFTJob whose training file does not exist: the trainer stops with a DataError. Also returns the
    SFTJobFailed alerts of the namespace just before it was applied."""
    firing = f'ALERTS{{alertname="SFTJobFailed",namespace="{installed.work}"}}'
    before = prometheus.query(firing)
    name = "missing-data"
    applied = installed.apply(name, tmp_path_factory.mktemp(name), runPolicy={"backoffLimit": 0},
                              dataset={"train": {"source": "pvc://datasets/tiny/data/missing.jsonl"}})
    run = installed.follow(name, applied, timeout=300)
    assert run.status.get("phase") == "Failed", installed.explain(name, run.status)
    return run, before


def test_prometheus_scrapes_the_operator_through_the_services_endpoints(installed, prometheus):  # noqa: F811
    release = installed.release
    selector = f"app.kubernetes.io/instance={release.name},app.kubernetes.io/component=operator"
    (pod,) = client.CoreV1Api(installed.cluster.api).list_namespaced_pod(release.namespace,
                                                                         label_selector=selector).items

    def up() -> list:
        return [t for t in prometheus.api("targets", state="active")["activeTargets"] if t["health"] == "up"]

    (target,) = installed.cluster.wait_for(up, 60, f"the operator's target to be up\n{prometheus.log_tail()}")
    # One target: the Service's `metrics` endpoint, i.e. the operator pod's IP on the node's bridge.
    assert target["scrapeUrl"] == f"http://{pod.status.pod_ip}:8080/metrics"
    labels = target["labels"]
    assert (labels["job"], labels["namespace"], labels["service"], labels["pod"], labels["endpoint"]) == \
        ("sft-operator", release.namespace, release.fullname, pod.metadata.name, "metrics")
    # The same Service's progress port was discovered too, and dropped by the ServiceMonitor's port rule.
    dropped = [t["discoveredLabels"] for t in prometheus.api("targets", state="dropped")["droppedTargets"]]
    assert any(d.get("__meta_kubernetes_service_name") == release.fullname
               and d.get("__meta_kubernetes_endpoint_port_name") == "progress" for d in dropped), dropped
    # The operator's series arrive with the target's labels: its unlabelled counters exist from the start.
    up_query = f'up{{job="sft-operator",service="{release.fullname}"}}'
    assert value(installed.cluster.wait_for(lambda: prometheus.query(up_query), 30, up_query)) == 1
    errors = f'sft_reconcile_errors_total{{job="sft-operator",namespace="{release.namespace}",pod="{pod.metadata.name}"}}'
    assert installed.cluster.wait_for(lambda: prometheus.query(errors), 30, errors)


def test_a_running_job_with_2_gpus_accrues_2_gpu_seconds_per_second_it_runs(gpu_job):
    run = gpu_job.run
    running = run.finished_after - run.running_after  # what `kubectl get sftjobs -w` showed as Running
    print(f"\nSFTJob {run.name}: Running for {running:.1f} s, sft_gpu_seconds_total grew by {gpu_job.gpu_seconds:.1f}")
    # Long enough that the operator's 2 s accounting rounds are a small part of it.
    assert running >= 20, f"the job ran only {running:.1f} s: too short to check the rate"
    assert gpu_job.gpu_seconds == pytest.approx(2 * running, rel=0.25), (gpu_job.gpu_seconds, running)


def test_a_failed_sftjob_fires_the_charts_failure_alert(installed, prometheus, failed_job):  # noqa: F811
    run, before = failed_job
    reason = run.status["reason"]
    assert reason == "DataError", run.status
    assert before == [], before  # nothing fired for the namespace until a job failed
    query = f'ALERTS{{alertname="SFTJobFailed",alertstate="firing",namespace="{installed.work}"}}'
    (firing,) = installed.cluster.wait_for(lambda: prometheus.query(query), 60, f"{query}\n{prometheus.log_tail()}")
    assert (firing["metric"]["reason"], firing["metric"]["severity"]) == (reason, "warning")
    # What the receiver of the notification reads.
    (alert,) = [a for a in prometheus.api("alerts")["alerts"]
                if a["labels"]["alertname"] == "SFTJobFailed" and a["labels"]["namespace"] == installed.work]
    assert alert["annotations"]["summary"] == f"SFTJob failed in {installed.work} ({reason})"
    assert f"kubectl get sftjobs -n {installed.work}" in alert["annotations"]["description"]


def test_every_dashboard_panel_shows_the_jobs_that_ran(installed, prometheus, gpu_job, failed_job):  # noqa: F811
    """Each query of the Grafana dashboard as its panel asks for it, over the time the jobs ran: an instant
    query at the end, a range query (2 s steps) over all of it. The per-job panels (losses, progress,
    tokens/s, learning rate) have data only while a job reports, which the range covers."""
    end = time.time()
    answers, empty = {}, {}
    for q in dashboard_queries():
        if q["instant"]:
            series = prometheus.query(q["expr"], at=end)
            points = [float(s["value"][1]) for s in series]
        else:
            series = prometheus.query_range(q["expr"], prometheus.started, end, INTERVAL_SECONDS)
            points = [float(v) for s in series for _, v in s["values"]]
        answers[q["title"]] = series
        if all(math.isnan(p) for p in points):  # no series, or only NaN (e.g. a quantile of nothing)
            empty[f"{q['title']} ({q['ref']})"] = (q["expr"], len(series))
    assert empty == {}, empty
    # The fleet panels count the namespace's first failure and its first GPU-seconds (series that began
    # inside the window, which increase() alone would show as 0).
    failures = {s["metric"]["reason"]: float(s["value"][1]) for s in answers["Failures by reason"]}
    assert failures == {"DataError": 1.0}, failures
    (gpu_hours,) = [float(s["value"][1]) for s in answers["GPU-hours by namespace"]
                    if s["metric"]["namespace"] == installed.work]
    assert gpu_hours * 3600 >= gpu_job.gpu_seconds, (gpu_hours * 3600, gpu_job.gpu_seconds)
