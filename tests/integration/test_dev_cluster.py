"""The dev/test control plane itself (the kwok-only cluster of the `control_plane` fixture): kwok
GPU nodes and their stages, the Job controller and namespace deletion, all against the real API
server. The real node has its own tests (test_real_node.py)."""

from __future__ import annotations

import json

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

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
