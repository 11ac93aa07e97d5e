"""The plain Prometheus configuration tests/integration/test_prometheus_e2e.py derives from the chart's rendered
ServiceMonitor and PrometheusRule, checked by Prometheus' own parser (promtool from scripts/prometheus-bin.sh)."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.integration.prometheus_server import prometheus_bin, rule_file, scrape_config
from tests.unit.test_helm_chart import NAMESPACE, RELEASE, objects, one

VALUES = {"prometheus": {"serviceMonitor": {"enabled": True, "interval": "15s", "scrapeTimeout": "5s"},
                         "rules": {"enabled": True}}}


def test_the_scrape_job_follows_the_service_monitor_and_prometheus_accepts_it(tmp_path):
    docs = objects(VALUES)
    job = scrape_config(one(docs, "ServiceMonitor"), tmp_path / "kubeconfig")
    assert (job["scrape_interval"], job["scrape_timeout"], job["metrics_path"], job["scheme"], job["honor_labels"]) \
        == ("15s", "5s", "/metrics", "http", True)
    assert job["kubernetes_sd_configs"][0]["namespaces"] == {"names": [NAMESPACE]}
    keeps = {tuple(r["source_labels"]): r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"}
    assert keeps[("__meta_kubernetes_service_label_app_kubernetes_io_instance",
                  "__meta_kubernetes_service_labelpresent_app_kubernetes_io_instance")] == f"({RELEASE});true"
    assert keeps[("__meta_kubernetes_endpoint_port_name",)] == "metrics"
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_file(one(docs, "PrometheusRule"))))
    config = {"rule_files": [str(tmp_path / "rules.yaml")], "scrape_configs": [job]}
    (tmp_path / "prometheus.yaml").write_text(yaml.safe_dump(config))
    check = subprocess.run([str(prometheus_bin() / "promtool"), "check", "config", str(tmp_path / "prometheus.yaml")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 4 rules found" in check.stdout


def test_a_service_monitor_field_the_mapping_does_not_translate_is_named():
    service_monitor = one(objects(VALUES), "ServiceMonitor")
    service_monitor["spec"]["endpoints"][0]["tlsConfig"] = {"insecureSkipVerify": True}
    with pytest.raises(ValueError, match=r"ServiceMonitor sft-sft-operator: fields this mapping does not translate: "
                                         r"\['tlsConfig'\]"):
        scrape_config(service_monitor, "kubeconfig")
