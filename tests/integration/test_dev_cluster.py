"""The dev/test control plane itself (the kwok-only cluster of the `control_plane` fixture): kwok
GPU nodes and their stages, the Job controller and namespace deletion, all against the real API
server; `stop|start|restart COMPONENT`, there and on the real node. The real node's own tests are
in test_real_node.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

import sft_devcluster as devcluster
from sft_devcluster import node as realnode

pytestmark = pytest.mark.cluster

KWOK_PLACEMENT = {"nodeSelector": {"type": "kwok"}}


def pod(name: str, command: list[str], placement: dict, annotations: dict | None = None, **spec) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 5,
            "containers": [{"name": "main", "image": "busybox", "command": command, **spec.pop("container", {})}],
            **placement,
            **spec,
        },
    }


def job(name: str, template_spec: dict, annotations: dict | None = None, **job_spec) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {"metadata": {"annotations": annotations or {}}, "spec": {"restartPolicy": "Never", **template_spec}},
            **job_spec,
        },
    }


def terminal(core: client.CoreV1Api, namespace: str, name: str):
    p = core.read_namespaced_pod(name, namespace)
    return p if p.status.phase in ("Succeeded", "Failed") else None


def job_condition(batch: client.BatchV1Api, namespace: str, name: str) -> str | None:
    conditions = batch.read_namespaced_job(name, namespace).status.conditions or []
    done = [c for c in conditions if c.type in ("Complete", "Failed") and c.status == "True"]
    return done[0].type if done else None


def main_state(p):
    (status,) = p.status.container_statuses
    return status.state.terminated


# ---------------------------------------------------------------------- nodes


def test_kwok_gpu_nodes_are_ready(control_plane, api):
    nodes = {n.metadata.name: n for n in client.CoreV1Api(api).list_node().items}
    assert set(nodes) == {"kwok-gpu-0", "kwok-gpu-1"}

    def ready(n):
        return any(c.type == "Ready" and c.status == "True" for c in n.status.conditions)

    for name in ("kwok-gpu-0", "kwok-gpu-1"):
        assert ready(nodes[name])
        assert nodes[name].status.allocatable["nvidia.com/gpu"] == "8"
        assert nodes[name].status.capacity["nvidia.com/gpu"] == "8"
        assert not nodes[name].spec.taints  # without a real node, pods need no toleration
    listed = control_plane.kubectl("get", "nodes", "-o", "name").stdout.split()
    assert set(listed) == {"node/kwok-gpu-0", "node/kwok-gpu-1"}


def test_api_server_reports_its_release_version(control_plane):
    version = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"].startswith("v1.")
    assert version["serverVersion"]["gitVersion"] != "v0.0.0-master"


# ---------------------------------------------------------------------- kwok nodes


def test_job_pod_on_a_kwok_gpu_node_completes_via_stages(control_plane, api, namespace):
    batch = client.BatchV1Api(api)
    spec = {**KWOK_PLACEMENT, "containers": [{"name": "train", "image": "trainer:dev",
                                              "resources": {"limits": {"nvidia.com/gpu": "8"}}}]}
    batch.create_namespaced_job(namespace, job("gpu", spec))
    assert control_plane.wait_for(lambda: job_condition(batch, namespace, "gpu"), 60, "the Job to finish") == "Complete"
    (p,) = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector="job-name=gpu").items
    assert p.spec.node_name.startswith("kwok-gpu-")
    assert main_state(p).reason == "Completed"


@pytest.mark.parametrize(
    ("annotations", "exit_code", "reason", "message"),
    [
        ({"sft.dev/kwok-exit-code": "65", "sft.dev/kwok-message": "DataError: bad row 7"}, 65, "Error", "DataError: bad row 7"),
        ({"sft.dev/kwok-oomkill": "true"}, 137, "OOMKilled", None),
    ],
    ids=["exit-code", "oomkilled"],
)
def test_kwok_failure_stages(control_plane, api, namespace, annotations, exit_code, reason, message):
    core = client.CoreV1Api(api)
    core.create_namespaced_pod(namespace, pod("sim", ["train"], KWOK_PLACEMENT, annotations))
    p = control_plane.wait_for(lambda: terminal(core, namespace, "sim"), 60, "the kwok pod to terminate")
    assert p.status.phase == "Failed"
    state = main_state(p)
    assert (state.exit_code, state.reason, state.message) == (exit_code, reason, message)


def test_kwok_hold_keeps_a_job_pod_running(control_plane, api, namespace):
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    batch.create_namespaced_job(namespace, job("held", {**KWOK_PLACEMENT, "containers": [
        {"name": "train", "image": "trainer:dev"}]}, annotations={"sft.dev/kwok-hold": "true"}))

    def running():
        pods = core.list_namespaced_pod(namespace, label_selector="job-name=held").items
        return pods and pods[0].status.phase == "Running"

    control_plane.wait_for(running, 60, "the pod to run")
    with pytest.raises(AssertionError):
        control_plane.wait_for(lambda: job_condition(batch, namespace, "held"), 3, "the Job to finish")


def test_kwok_delay_keeps_a_job_pod_running_for_a_while(control_plane, api, namespace):
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    batch.create_namespaced_job(namespace, job("slow", {**KWOK_PLACEMENT, "containers": [
        {"name": "train", "image": "trainer:dev"}]}, annotations={"sft.dev/kwok-delay": "10s"}))

    def running():
        pods = core.list_namespaced_pod(namespace, label_selector="job-name=slow").items
        return pods and pods[0].status.phase == "Running"

    control_plane.wait_for(running, 60, "the pod to run")
    assert job_condition(batch, namespace, "slow") is None
    assert control_plane.wait_for(lambda: job_condition(batch, namespace, "slow"), 60, "the Job to finish") == "Complete"


# ---------------------------------------------------------------------- namespaces


def test_namespace_deletion_removes_its_pods(control_plane, api):
    core = client.CoreV1Api(api)
    name = "ns-deletion-check"
    core.create_namespace({"metadata": {"name": name}})
    control_plane.wait_for(lambda: core.read_namespaced_service_account("default", name), 30, "the default SA")
    core.create_namespaced_pod(name, pod("kwok", ["train"], KWOK_PLACEMENT))
    control_plane.wait_for(
        lambda: all(p.status.phase == "Running" for p in core.list_namespaced_pod(name).items), 60, "pods to run")
    core.delete_namespace(name)

    def gone():
        try:
            core.read_namespace(name)
            return False
        except ApiException as exc:
            return exc.status == 404

    control_plane.wait_for(gone, 90, "the namespace to be deleted")


# ---------------------------------------------------------------------- stop|start|restart COMPONENT


def sftctl_dev_cluster(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sft_devcluster", *args], capture_output=True, text=True, timeout=180)


def test_etcd_and_api_server_restarts_keep_every_object_and_the_api_answers_again(control_plane, api, namespace):
    core = client.CoreV1Api(api)
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "kept"}, "data": {"step": "42"}})
    for name, kill in (("etcd", False), ("kube-apiserver", False), ("etcd", True), ("kube-apiserver", True)):
        before = devcluster.state.running_components(control_plane.state_dir)[name]
        started = devcluster.restart_component(control_plane.state_dir, name, kill=kill)
        assert started.pid != before and not started.not_checked
        # The API server's etcd client reconnects on its own: poll until it answers.
        kept = control_plane.wait_for(lambda: core.read_namespaced_config_map("kept", namespace), 30,
                                      f"the API to answer after {name} restarted")
        assert kept.data == {"step": "42"}
    # The same, as one command; a new object is written and read back through the restarted server.
    cli = sftctl_dev_cluster("restart", "kube-apiserver", "--kill", "--dir", str(control_plane.state_dir))
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.startswith("restarted kube-apiserver (pid ") and "/readyz after" in cli.stdout
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "after"}, "data": {"step": "43"}})
    assert core.read_namespaced_config_map("after", namespace).data == {"step": "43"}
    assert {n.metadata.name for n in core.list_node().items} == {"kwok-gpu-0", "kwok-gpu-1"}


def test_a_stopped_component_shows_as_stopped_and_start_brings_it_back(control_plane):
    state = ["--dir", str(control_plane.state_dir)]
    stopped = sftctl_dev_cluster("stop", "kube-scheduler", *state)
    try:
        assert stopped.returncode == 0 and stopped.stdout.startswith("stopped kube-scheduler (pid "), stopped.stderr
        assert sftctl_dev_cluster("stop", "kube-scheduler", *state).stdout == "kube-scheduler is already stopped\n"
        status = sftctl_dev_cluster("status", *state)
        assert status.returncode == 1 and "kube-scheduler           stopped" in status.stdout
    finally:
        started = sftctl_dev_cluster("start", "kube-scheduler", *state)
    assert started.returncode == 0 and "started kube-scheduler (pid" in started.stdout, started.stderr
    assert sftctl_dev_cluster("start", "kube-scheduler", *state).stdout.startswith("kube-scheduler is already running")
    assert sftctl_dev_cluster("status", *state).returncode == 0
    refused = sftctl_dev_cluster("stop", "kubelet", *state)  # this cluster has no real node
    assert refused.returncode == 1 and "part of the real node" in refused.stderr


def _processes_with(token: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and token.encode() in devcluster.processes.read_proc(int(entry), "cmdline"):
            found.append(int(entry))
    return found


def test_pods_keep_running_while_the_kubelet_and_containerd_are_down_and_the_node_comes_back(
        real_node, node_namespace):
    core = client.CoreV1Api(real_node.api)
    busybox = realnode.archive_reference(devcluster.state.node_cache_dir() / "images" / "busybox.tar")
    token = f"survivor-{uuid.uuid4().hex[:8]}"
    script = f"i=0; while true; do i=$((i+1)); echo $i; sleep 1; done # {token}"
    core.create_namespaced_pod(node_namespace, {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "counter"},
        "spec": {"securityContext": {"runAsNonRoot": True, "runAsUser": 65534,
                                     "seccompProfile": {"type": "RuntimeDefault"}},
                 "containers": [{"name": "main", "image": busybox, "imagePullPolicy": "Never",
                                 "command": ["sh", "-c", script],
                                 "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}]}})

    def running():
        p = core.read_namespaced_pod("counter", node_namespace)
        return p if p.status.phase == "Running" and p.status.container_statuses[0].state.running else None

    before = real_node.wait_for(running, 60, "the pod to run").status.container_statuses[0]
    (pid,) = _processes_with(token)
    counted_before = real_node.wait_for(lambda: real_node.pod_log(node_namespace, "counter").split(), 30, "a log line")
    state = real_node.state_dir
    devcluster.stop_component(state, "kubelet", kill=True)  # a crash
    devcluster.stop_component(state, "containerd")
    assert {"kubelet", "containerd"}.isdisjoint(devcluster.state.running_components(state))
    assert _processes_with(token) == [pid]  # the container outlives both

    assert devcluster.start_component(state, "containerd").not_checked == ()
    assert devcluster.start_component(state, "kubelet").not_checked == ()  # node Ready, lease renewed
    node = core.read_node(realnode.NODE_NAME)
    assert any(c.type == "Ready" and c.status == "True" for c in node.status.conditions)
    after = real_node.wait_for(running, 30, "the pod to be Running").status.container_statuses[0]
    assert (after.container_id, after.restart_count) == (before.container_id, 0)
    assert _processes_with(token) == [pid]
    log = real_node.pod_log(node_namespace, "counter").split()
    # One run that counted on: a restarted container would have begun again at 1.
    assert log == [str(i) for i in range(1, len(log) + 1)] and len(log) > len(counted_before)
