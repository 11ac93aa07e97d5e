"""A real control plane for integration tests: no mocks stand in for the API server.

`control_plane` (session scope) builds or reuses the binaries (scripts/k8s-bin.sh) and
starts its own kwok-only cluster (simulated GPU nodes and pods, no root, no node lock) in a
temporary state dir with free ports, independent of a developer's `sftctl dev-cluster up`;
it stops every process at the end. If the binaries
can't be built or the cluster can't start, the tests error with the reason; nothing is
skipped. `namespace` gives each test a fresh namespace and deletes it afterwards.

`real_node` (session scope, started on first use) is a second cluster with the real node
`sft-node-0` (kubelet, containerd, CNI, kube-proxy, CoreDNS; scripts/node-bin.sh builds
what it runs). A test asks for it by naming the fixture (or `node_namespace`, a fresh
Pod Security "restricted" namespace on it). One real node runs per machine, so the tests
that use it run last, and wait up to SFT_REAL_NODE_WAIT seconds (default 600) for another
session's node; if the node can't start they fail with the reason, never skip.
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

from .host_snapshot import host_snapshot

@dataclass
class ControlPlane:
    info: devcluster.ClusterInfo
    api: client.ApiClient
    host_before: dict | None = None  # real node: the host as it was before `up`

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
        """`kubectl logs` of a pod (on the real node; kwok pods have none)."""
        return self.kubectl("logs", "-n", namespace, pod, check=False).stdout

    def import_images(self, *archives: Path) -> list[tuple[str, str]]:
        """Load image archives into the real node (skipped when already there)."""
        return devcluster.import_images(self.state_dir, list(archives))

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


def uses_real_node(item) -> bool:
    return bool({"real_node", "node_namespace"} & set(getattr(item, "fixturenames", ())))


# trylast: after `-m`/`-k` deselection, so that a selection without such tests builds nothing.
@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    """Build (or find) the binaries before any test starts, so that a cold build (about
    15 minutes) doesn't count against the first test's timeout. The real node's tests go
    last (the node is held from the first of them to the end of the session), and the one
    that stops it after them."""
    node_items = [item for item in items if uses_real_node(item)]
    after = [item for item in items if item.get_closest_marker("after_real_node")]
    if node_items or after:
        last = [item for item in node_items if item.get_closest_marker("stops_real_node")]
        items[:] = ([item for item in items if not uses_real_node(item) and item not in after]
                    + [item for item in node_items if item not in last] + last + after)
        node_items += after
    if _binaries or not any(item.get_closest_marker("cluster") for item in items):
        return
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    builds = [("dir", "control plane", "k8s-bin", devcluster.ensure_binaries)]
    if node_items:
        builds.append(("node", "real node", "node-bin", devcluster.ensure_node_binaries))
    for key, what, script, build in builds:
        if reporter:
            log = devcluster.state.cache_dir() / f"{script}.log"
            reporter.write_line(f"{what} binaries: scripts/{script}.sh (log {log})")
        try:
            _binaries[key] = str(build())
        except devcluster.DevClusterError as exc:
            _binaries[f"{key}-error"] = str(exc)
            break


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory) -> ControlPlane:
    if "dir-error" in _binaries:
        pytest.fail(f"the control plane binaries could not be built: {_binaries['dir-error']}", pytrace=False)
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


@pytest.fixture(scope="session")
def real_node(tmp_path_factory) -> ControlPlane:
    """A cluster with the real node (and one tainted kwok GPU node); see the module docstring."""
    for key in ("dir-error", "node-error"):
        if key in _binaries:
            pytest.fail(f"the real node's binaries could not be built: {_binaries[key]}", pytrace=False)
    state_dir = tmp_path_factory.mktemp("real-node")
    before = host_snapshot()
    try:
        info = devcluster.up(state_dir, gpu_nodes=1, stop_with_pid=os.getpid(), real_node=True, timeout=180,
                             node_wait=float(os.environ.get("SFT_REAL_NODE_WAIT", "600")))
    except devcluster.DevClusterError as exc:
        pytest.fail(f"the real node could not start: {exc}", pytrace=False)
    api = config.new_client_from_config(config_file=info.kubeconfig)
    try:
        yield ControlPlane(info, api, host_before=before)
    finally:
        api.close()
        devcluster.down(state_dir)


@pytest.fixture
def node_namespace(real_node, request) -> str:
    """A fresh Pod Security "restricted" namespace on the real node's cluster."""
    yield from _fresh_namespace(real_node, request, {"pod-security.kubernetes.io/enforce": "restricted",
                                                     "pod-security.kubernetes.io/enforce-version": "latest"})


@pytest.fixture
def api(control_plane) -> client.ApiClient:
    return control_plane.api


@pytest.fixture
def namespace(control_plane, request) -> str:
    """A fresh namespace whose default ServiceAccount exists (pods need it); deleted after the test."""
    yield from _fresh_namespace(control_plane, request)


def _fresh_namespace(cluster: ControlPlane, request, labels: dict | None = None):
    core = client.CoreV1Api(cluster.api)
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{slug}-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": name, "labels": {"sft.dev/test": "true", **(labels or {})}}})
    cluster.wait_for(lambda: core.read_namespaced_service_account("default", name), 30,
                     f"ServiceAccount default in {name}")
    yield name
    # kwok never moves a deleted pod to a terminal phase (a kubelet would), so the Job controller's tracking
    # finalizer would keep a still-running simulated pod, and its GPUs, forever: release them first.
    for pod in core.list_namespaced_pod(name).items:
        if pod.metadata.finalizers and (pod.spec.node_name or "").startswith("kwok-"):
            try:
                core.patch_namespaced_pod(pod.metadata.name, name, {"metadata": {"finalizers": None}})
            except ApiException as exc:
                if exc.status != 404:
                    raise
    try:
        core.delete_namespace(name)
    except ApiException as exc:
        if exc.status != 404:
            raise


_shared: dict[str, OperatorProcess] = {}


@pytest.fixture
def operator(control_plane, namespace, tmp_path_factory):
    """The operator as a subprocess (plaintext progress, short grace), one for all the tests that use this
    fixture: it watches every namespace and runs while such tests follow each other (starting it costs each
    test more than a second); before any other test it is stopped (pytest_runtest_teardown below), since
    that test may start an operator of its own. A test that stopped or killed it gets it back here."""
    op = _shared.get("operator")
    if op is None:
        op = _shared["operator"] = OperatorProcess.plaintext(
            control_plane.kubeconfig, tmp_path_factory.mktemp("operator") / "operator.log", [],
            "--pod-start-grace-seconds", str(PULL_GRACE))
    if op.proc is None or op.proc.poll() is not None:
        op.start()
    else:
        op.wait_healthy()
    yield op
    print(f"--- operator log (this test: {namespace}) ---\n{op.log_tail(200)}")  # shown when the test failed


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item, nextitem):
    """The shared operator stops once the next test does not use it (or none follows)."""
    op = _shared.get("operator")
    if op is not None and "operator" in getattr(item, "fixturenames", ()) and (
            nextitem is None or "operator" not in getattr(nextitem, "fixturenames", ())):
        op.stop()


@pytest.fixture
def k8s(control_plane, namespace) -> Cluster:
    return Cluster(control_plane, namespace)
