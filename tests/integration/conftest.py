"""A real control plane for integration tests: no mocks stand in for the API server.

`control_plane` (session scope) builds or reuses the binaries (scripts/k8s-bin.sh) and
starts its own cluster in a temporary state dir with free ports, independent of a
developer's `sftctl dev-cluster up`; it stops every process at the end. If the binaries
can't be built or the cluster can't start, the tests error with the reason; nothing is
skipped. `namespace` gives each test a fresh namespace and deletes it afterwards.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

import sft_devcluster as devcluster
from support import OperatorProcess

from .sftjob_cluster import PULL_GRACE, Cluster

PROCESS_NODE = "sft-local-0"
# What a pod needs to land on the process-backed node.
PROCESS_NODE_PLACEMENT = {
    "nodeSelector": {"sft.dev/process-node": "true"},
    "tolerations": [{"key": "sft.dev/process-node", "operator": "Equal", "value": "true", "effect": "NoSchedule"}],
}


@dataclass
class ControlPlane:
    info: devcluster.ClusterInfo
    api: client.ApiClient

    @property
    def kubeconfig(self) -> Path:
        return Path(self.info.kubeconfig)

    @property
    def state_dir(self) -> Path:
        return Path(self.info.state_dir)

    @property
    def bin_dir(self) -> Path:
        return Path(self.info.bin_dir)

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.bin_dir / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True, text=True, check=check, input=input,
        )

    def pod_log(self, namespace: str, pod: str) -> str:
        """Output of a pod that ran on the process-backed node."""
        path = self.state_dir / "logs" / f"{namespace}_{pod}.log"
        return path.read_text() if path.exists() else ""

    @staticmethod
    def wait_for(predicate, timeout: float = 60.0, what: str = "condition", interval: float = 0.25):
        """Poll ``predicate`` until it returns something truthy; return that value."""
        deadline = time.monotonic() + timeout
        last_error = None
        while time.monotonic() < deadline:
            try:
                value = predicate()
                if value:
                    return value
            except ApiException as exc:
                last_error = exc
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_error})" if last_error else ""))


_binaries: dict[str, str] = {}


def pytest_collection_modifyitems(session, config, items):
    """Build (or find) the binaries before any test starts, so that a cold build (about
    15 minutes) doesn't count against the first test's timeout."""
    if _binaries or not any(item.get_closest_marker("cluster") for item in items):
        return
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter:
        reporter.write_line(f"control plane binaries: scripts/k8s-bin.sh (log {devcluster.cluster.cache_dir() / 'k8s-bin.log'})")
    try:
        _binaries["dir"] = str(devcluster.ensure_binaries())
    except devcluster.DevClusterError as exc:
        _binaries["error"] = str(exc)


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory) -> ControlPlane:
    if "error" in _binaries:
        pytest.fail(f"the control plane binaries could not be built: {_binaries['error']}", pytrace=False)
    state_dir = tmp_path_factory.mktemp("control-plane")
    try:
        # stop_with_pid: no leftover processes even if the session is killed (e.g. by `timeout`).
        info = devcluster.up(state_dir, gpu_nodes=2, stop_with_pid=os.getpid())
    except devcluster.DevClusterError as exc:
        pytest.fail(f"the test control plane could not start: {exc}", pytrace=False)
    api = config.new_client_from_config(config_file=info.kubeconfig)
    try:
        yield ControlPlane(info, api)
    finally:
        api.close()
        devcluster.down(state_dir)


@pytest.fixture
def api(control_plane) -> client.ApiClient:
    return control_plane.api


@pytest.fixture
def namespace(control_plane, request) -> str:
    """A fresh namespace whose default ServiceAccount exists (pods need it); deleted after the test."""
    core = client.CoreV1Api(control_plane.api)
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{slug}-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": name, "labels": {"sft.dev/test": "true"}}})
    control_plane.wait_for(lambda: core.read_namespaced_service_account("default", name), 30,
                           f"ServiceAccount default in {name}")
    yield name
    try:
        core.delete_namespace(name)
    except ApiException as exc:
        if exc.status != 404:
            raise


@pytest.fixture
def operator(control_plane, namespace, tmp_path):
    """The operator as a subprocess watching the test's namespace (plaintext progress, short grace)."""
    op = OperatorProcess.plaintext(control_plane.kubeconfig, tmp_path / f"operator-{namespace}.log", namespace,
                                   "--pod-start-grace-seconds", str(PULL_GRACE))
    op.start()
    yield op
    op.stop()
    print(f"--- operator log ({namespace}) ---\n{op.log_tail(200)}")  # shown when the test failed


@pytest.fixture
def k8s(control_plane, namespace) -> Cluster:
    return Cluster(control_plane, namespace)
