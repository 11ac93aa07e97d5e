"""The dev/test control plane itself: nodes, the process-backed node, kwok stages,
the Job controller, service-account tokens and namespace deletion, all against the
real API server."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from sft_devcluster.process_node import image_paths

from .conftest import PROCESS_NODE, PROCESS_NODE_PLACEMENT

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


def test_kwok_gpu_nodes_and_process_node_are_ready(control_plane, api):
    nodes = {n.metadata.name: n for n in client.CoreV1Api(api).list_node().items}
    assert {"kwok-gpu-0", "kwok-gpu-1", PROCESS_NODE} <= set(nodes)

    def ready(n):
        return any(c.type == "Ready" and c.status == "True" for c in n.status.conditions)

    for name in ("kwok-gpu-0", "kwok-gpu-1"):
        assert ready(nodes[name])
        assert nodes[name].status.allocatable["nvidia.com/gpu"] == "8"
        assert nodes[name].status.capacity["nvidia.com/gpu"] == "8"
    local = nodes[PROCESS_NODE]
    assert ready(local)
    assert local.metadata.labels["sft.dev/process-node"] == "true"
    assert ("sft.dev/process-node", "true", "NoSchedule") in [(t.key, t.value, t.effect) for t in local.spec.taints]
    listed = control_plane.kubectl("get", "nodes", "-o", "name").stdout.split()
    assert {"node/kwok-gpu-0", "node/kwok-gpu-1", f"node/{PROCESS_NODE}"} <= set(listed)


def test_api_server_reports_its_release_version(control_plane):
    version = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"].startswith("v1.")
    assert version["serverVersion"]["gitVersion"] != "v0.0.0-master"


# ---------------------------------------------------------------------- process node


def test_process_pod_really_runs_and_fails_with_its_exit_code(control_plane, api, namespace):
    core = client.CoreV1Api(api)
    # The background sleep must not outlive the container (kubelet semantics).
    script = "sleep 300 & echo hi > /work/x; cat /work/x; echo 'disk full' > /dev/termination-log; exit 3"
    core.create_namespaced_pod(namespace, pod(
        "fails", ["sh", "-c", script], PROCESS_NODE_PLACEMENT,
        volumes=[{"name": "work", "emptyDir": {}}],
        container={"volumeMounts": [{"name": "work", "mountPath": "/work"}]},
    ))
    p = control_plane.wait_for(lambda: terminal(core, namespace, "fails"), 60, "pod to terminate")
    assert p.spec.node_name == PROCESS_NODE
    assert p.status.phase == "Failed"
    state = main_state(p)
    assert (state.exit_code, state.reason, state.message) == (3, "Error", "disk full")
    assert p.status.pod_ip == "127.0.0.1"
    assert "hi" in control_plane.pod_log(namespace, "fails")
    pgid = int(state.container_id.rpartition("/")[2])
    control_plane.wait_for(lambda: not _process_group_alive(pgid), 10, "the container's background process to go")


def _process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_process_pod_succeeds_with_env_volumes_and_pvc(control_plane, api, namespace):
    core = client.CoreV1Api(api)
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "cfg"}, "data": {"config.json": '{"lr": 2e-5}', "lr": "2e-5"}})
    core.create_namespaced_secret(namespace, {"metadata": {"name": "hf"}, "stringData": {"token": "s3cret"}})
    core.create_namespaced_persistent_volume_claim(namespace, {
        "metadata": {"name": "models"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    })
    script = (
        'set -eu; test "$GREETING" = hello-world; test "$1" = hello; '
        'test "$(cat /etc/sft/config.json)" = \'{"lr": 2e-5}\'; '
        'if touch /etc/sft/new 2>/dev/null; then echo config mount is writable; exit 9; fi; '
        'echo "$POD_NAMESPACE $POD_NAME $HF_TOKEN $CFG_lr" > /mnt/pvc/models/out.txt; '
        'echo scratch > /scratch/s; pwd > /mnt/pvc/models/pwd.txt; '
        'ls -A /tmp > /mnt/pvc/models/tmp.txt'
    )
    core.create_namespaced_pod(namespace, pod(
        "succeeds", ["sh", "-c", script, "sh", "$(BASE)"], PROCESS_NODE_PLACEMENT,
        volumes=[
            {"name": "config", "configMap": {"name": "cfg"}},
            {"name": "models", "persistentVolumeClaim": {"claimName": "models"}},
            {"name": "scratch", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
        ],
        container={
            "workingDir": "/scratch",
            "env": [
                {"name": "BASE", "value": "hello"},
                {"name": "GREETING", "value": "$(BASE)-world"},
                {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
            ],
            "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
            "volumeMounts": [
                {"name": "config", "mountPath": "/etc/sft", "readOnly": True},
                {"name": "models", "mountPath": "/mnt/pvc/models"},
                {"name": "scratch", "mountPath": "/scratch"},
                # Over the state dir's parent (pytest's temp dir): other sources must stay visible.
                {"name": "tmp", "mountPath": "/tmp"},
            ],
        },
    ))
    control_plane.wait_for(
        lambda: core.read_namespaced_persistent_volume_claim("models", namespace).status.phase == "Bound",
        60, "the PVC to bind (kwok volume stages)")
    p = control_plane.wait_for(lambda: terminal(core, namespace, "succeeds"), 60, "pod to terminate")
    assert p.status.phase == "Succeeded", control_plane.pod_log(namespace, "succeeds")
    state = main_state(p)
    assert (state.exit_code, state.reason) == (0, "Completed")
    host_pvc = control_plane.state_dir / "pvc" / "models"
    assert (host_pvc / "out.txt").read_text() == f"{namespace} succeeds s3cret 2e-5\n"
    assert (host_pvc / "pwd.txt").read_text() == "/scratch\n"
    # The emptyDir at /tmp is empty, but for the "image" paths put back (a checkout under /tmp).
    put_back = {Path(p).relative_to("/tmp").parts[0] for p in image_paths() if p.startswith("/tmp/")}
    assert set((host_pvc / "tmp.txt").read_text().split()) == put_back
    assert not os.path.exists("/scratch/s"), "emptyDir must be private to the pod's mount namespace"
    ready = {c.type: c.status for c in p.status.conditions}
    assert ready["PodScheduled"] == "True" and ready["Ready"] == "False"


def test_projected_token_with_custom_audience_passes_token_review(control_plane, api, namespace):
    core = client.CoreV1Api(api)
    core.create_namespaced_persistent_volume_claim(namespace, {
        "metadata": {"name": "out"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    })
    core.create_namespaced_pod(namespace, pod(
        "token", ["sh", "-c", "cp /var/run/secrets/sft.dev/progress/token /out/token"], PROCESS_NODE_PLACEMENT,
        volumes=[
            {"name": "out", "persistentVolumeClaim": {"claimName": "out"}},
            {"name": "progress", "projected": {"sources": [{"serviceAccountToken": {
                "audience": "sft.dev/progress", "expirationSeconds": 600, "path": "token"}}]}},
        ],
        container={"volumeMounts": [
            {"name": "out", "mountPath": "/out"},
            {"name": "progress", "mountPath": "/var/run/secrets/sft.dev/progress", "readOnly": True},
        ]},
    ))
    p = control_plane.wait_for(lambda: terminal(core, namespace, "token"), 60, "pod to terminate")
    assert p.status.phase == "Succeeded", control_plane.pod_log(namespace, "token")
    token = (control_plane.state_dir / "pvc" / "out" / "token").read_text()

    auth = client.AuthenticationV1Api(api)

    def review(audience: str):
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": token, "audiences": [audience]}}
        return auth.create_token_review(body).status

    ok = review("sft.dev/progress")
    assert ok.authenticated, ok.error
    assert ok.user.username == f"system:serviceaccount:{namespace}:default"
    assert ok.user.extra["authentication.kubernetes.io/pod-name"] == ["token"]
    assert not review("https://kubernetes.default.svc.cluster.local").authenticated


def test_deleting_a_running_process_pod_kills_it(control_plane, api, namespace):
    core = client.CoreV1Api(api)
    core.create_namespaced_pod(namespace, pod("sleeper", ["sleep", "300"], PROCESS_NODE_PLACEMENT))

    def running_pid():
        p = core.read_namespaced_pod("sleeper", namespace)
        statuses = p.status.container_statuses or []
        if p.status.phase == "Running" and statuses and statuses[0].state.running:
            return int(statuses[0].container_id.rpartition("/")[2])
        return None

    pid = control_plane.wait_for(running_pid, 60, "the pod to run")
    assert os.path.exists(f"/proc/{pid}")
    core.delete_namespaced_pod("sleeper", namespace)

    def gone():
        try:
            core.read_namespaced_pod("sleeper", namespace)
            return False
        except ApiException as exc:
            return exc.status == 404

    control_plane.wait_for(gone, 30, "the pod to disappear")
    control_plane.wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10, "the process to exit")


def test_indexed_job_runs_through_the_job_controller_on_the_process_node(control_plane, api, namespace):
    batch = client.BatchV1Api(api)
    spec = {
        **PROCESS_NODE_PLACEMENT,
        "containers": [{"name": "main", "image": "busybox",
                        "command": ["sh", "-c", "echo index=$JOB_COMPLETION_INDEX rank=$(RANK)"],
                        "env": [{"name": "RANK", "valueFrom": {"fieldRef": {
                            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}}]}],
    }
    batch.create_namespaced_job(namespace, job("indexed", spec, completionMode="Indexed", completions=2, parallelism=2))
    assert control_plane.wait_for(lambda: job_condition(batch, namespace, "indexed"), 90, "the Job to finish") == "Complete"
    pods = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector="job-name=indexed").items
    logs = "".join(control_plane.pod_log(namespace, p.metadata.name) for p in pods)
    assert "index=0 rank=0" in logs and "index=1 rank=1" in logs


def test_pod_failure_policy_sees_the_process_exit_code(control_plane, api, namespace):
    batch = client.BatchV1Api(api)
    spec = {**PROCESS_NODE_PLACEMENT,
            "containers": [{"name": "main", "image": "busybox", "command": ["sh", "-c", "exit 42"]}]}
    policy = {"rules": [{"action": "FailJob", "onExitCodes": {"operator": "In", "values": [42]}}]}
    batch.create_namespaced_job(namespace, job("policy", spec, backoffLimit=3, podFailurePolicy=policy))
    assert control_plane.wait_for(lambda: job_condition(batch, namespace, "policy"), 90, "the Job to fail") == "Failed"
    failed = next(c for c in batch.read_namespaced_job("policy", namespace).status.conditions if c.type == "Failed")
    assert failed.reason == "PodFailurePolicy"


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


def test_namespace_deletion_removes_pods_on_both_kinds_of_node(control_plane, api):
    core = client.CoreV1Api(api)
    name = "ns-deletion-check"
    core.create_namespace({"metadata": {"name": name}})
    control_plane.wait_for(lambda: core.read_namespaced_service_account("default", name), 30, "the default SA")
    core.create_namespaced_pod(name, pod("kwok", ["train"], KWOK_PLACEMENT))
    core.create_namespaced_pod(name, pod("local", ["sleep", "300"], PROCESS_NODE_PLACEMENT))
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
