"""A real Prometheus server on the host, configured from the chart's ServiceMonitor and PrometheusRule the
way the Prometheus Operator would configure its own, for tests/integration/test_prometheus_e2e.py.

The binary is built from Prometheus' Go module with its Kubernetes service discovery
(scripts/prometheus-bin.sh). `scrape_config` and `rule_file` are pure: they map the rendered
monitoring.coreos.com objects to plain Prometheus configuration: `kubernetes_sd_configs` with
`role: endpoints` against the dev cluster's API server, then the relabelling the Prometheus Operator
generates, so that selecting the Service and port, and every target label, is Prometheus' own work.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


def prometheus_bin() -> Path:
    """The folder holding `prometheus` and `promtool`, built once (~3 min cold; scripts/test.sh starts the
    build beside the first tests, and its lock makes this wait for it) and reused."""
    proc = subprocess.run(["bash", str(REPO / "scripts" / "prometheus-bin.sh")], capture_output=True, text=True,
                          timeout=1200)
    if proc.returncode != 0:
        raise AssertionError(f"scripts/prometheus-bin.sh failed ({proc.returncode}):\n{proc.stderr}")
    return Path(proc.stdout.splitlines()[-1])


TRANSLATED = {"port", "path", "scheme", "interval", "scrapeTimeout", "honorLabels"}  # of an endpoint


def _label(name: str) -> str:
    """A Kubernetes label name as a service-discovery meta label suffix (Prometheus' sanitising)."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def scrape_config(service_monitor: dict[str, Any], kubeconfig: str | Path, index: int = 0) -> dict[str, Any]:
    """The scrape job the Prometheus Operator generates for endpoint ``index`` of ``service_monitor``:
    endpoints discovery in the namespaces of its namespaceSelector, keep the Services whose labels match its
    selector and the endpoint port of that name, then the operator's target labels."""
    meta, spec = service_monitor["metadata"], service_monitor["spec"]
    endpoint = spec["endpoints"][index]
    # A field this mapping ignored would make the test prove less than it claims.
    left = sorted((set(spec["selector"]) - {"matchLabels"}) | (set(endpoint) - TRANSLATED))
    if left:
        raise ValueError(f"ServiceMonitor {meta['name']}: fields this mapping does not translate: {left}")
    names = spec.get("namespaceSelector", {}).get("matchNames") or [meta["namespace"]]
    relabel: list[dict[str, Any]] = []
    for key, value in spec["selector"]["matchLabels"].items():
        relabel.append({"action": "keep", "regex": f"({re.escape(value)});true",
                        "source_labels": [f"__meta_kubernetes_service_label_{_label(key)}",
                                          f"__meta_kubernetes_service_labelpresent_{_label(key)}"]})
    relabel += [
        {"action": "keep", "source_labels": ["__meta_kubernetes_endpoint_port_name"], "regex": endpoint["port"]},
        {"source_labels": ["__meta_kubernetes_endpoint_address_target_kind",
                           "__meta_kubernetes_endpoint_address_target_name"],
         "separator": ";", "regex": "Pod;(.*)", "replacement": "${1}", "target_label": "pod"},
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        # Finished pods keep their endpoint address a moment; the Prometheus Operator drops them.
        {"action": "drop", "source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)"},
        {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job"},
    ]
    if spec.get("jobLabel"):
        relabel.append({"source_labels": [f"__meta_kubernetes_service_label_{_label(spec['jobLabel'])}"],
                        "regex": "(.+)", "replacement": "${1}", "target_label": "job"})
    relabel.append({"target_label": "endpoint", "replacement": endpoint["port"]})
    job: dict[str, Any] = {
        "job_name": f"serviceMonitor/{meta['namespace']}/{meta['name']}/{index}",
        "honor_labels": bool(endpoint.get("honorLabels", False)),
        "kubernetes_sd_configs": [{"role": "endpoints", "kubeconfig_file": str(kubeconfig),
                                   "namespaces": {"names": list(names)}}],
        "metrics_path": endpoint.get("path", "/metrics"),
        "scheme": endpoint.get("scheme", "http"),
        "relabel_configs": relabel,
    }
    if "interval" in endpoint:
        job["scrape_interval"] = endpoint["interval"]
    if "scrapeTimeout" in endpoint:
        job["scrape_timeout"] = endpoint["scrapeTimeout"]
    return job


def rule_file(prometheus_rule: dict[str, Any]) -> dict[str, Any]:
    """A Prometheus rule file holding the PrometheusRule's groups (what the Prometheus Operator mounts)."""
    return {"groups": prometheus_rule["spec"]["groups"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """One `prometheus` process on loopback with its data in ``folder``; ``stop`` ends it."""

    def __init__(self, folder: Path, config: dict[str, Any], rules: dict[str, Any]) -> None:
        self.folder = folder
        (folder / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
        self.config_file = folder / "prometheus.yaml"
        self.config_file.write_text(yaml.safe_dump({**config, "rule_files": [str(folder / "rules.yaml")]},
                                                   sort_keys=False))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> None:
        binary = prometheus_bin() / "prometheus"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen([str(binary), f"--config.file={self.config_file}",
                                          f"--storage.tsdb.path={self.folder / 'data'}",
                                          f"--web.listen-address=127.0.0.1:{self.port}"],
                                         stdout=log, stderr=subprocess.STDOUT, cwd=self.folder)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        raise AssertionError(f"prometheus not ready after {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""

    def api(self, path: str, **params: Any) -> Any:
        """GET /api/v1/``path``; returns its `data`, or raises with Prometheus' error."""
        url = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:  # 400/422: a bad query; the body says why
            body = json.load(exc)
        if body.get("status") != "success":
            raise AssertionError(f"{url}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """The instant vector of ``expr`` now (or ``at``): [{"metric": {...}, "value": [t, "v"]}, ...]."""
        return self.api("query", query=expr, **({"time": f"{at:.3f}"} if at is not None else {}))["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """What a Grafana panel draws over [start, end]: [{"metric": {...}, "values": [[t, "v"], ...]}, ...]."""
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step}s")["result"]
