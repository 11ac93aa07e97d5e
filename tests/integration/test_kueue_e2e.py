"""Kueue for real, on the real node: its manager built from its Go module (scripts/kueue-bin.sh) runs in
the dev cluster with its webhooks on loopback (``sft_devcluster.kueue``), the chart's operator runs in
its image, and SFTJobs name a LocalQueue in ``spec.scheduling.queueName``.

Kueue manages the trainer Job the operator creates (its batch/Job integration): its webhook creates the
Job suspended, it admits the Job whole or not at all against the ClusterQueue's quota, and it preempts by
suspending the Job again. The SFTJob follows: ``Queued`` with Kueue's own message while it waits, and a
preempted run saves on SIGTERM and resumes from that checkpoint when admitted again.

One ClusterQueue with a quota of 2 GPUs, three jobs:
  low   2 GPUs, low priority, long, checkpoints  -> admitted first, trains
  gang  2 pods x 1 GPU, low priority             -> Queued (no quota left), with Kueue's message, no pod
  high  1 GPU, high priority                     -> preempts low; 1 GPU stays free, yet gang gets no pod
then high finishes -> gang is admitted as one (both pods) and trains -> low is admitted again and
resumes from the checkpoint it saved when preempted, with backoffLimit 0 untouched.
"""

from __future__ import annotations

import time

import pytest
from kubernetes import client

from sft_devcluster import kueue as devcluster_kueue

from .test_chaos import resumed_step, trainer_step
from .test_end_to_end import Installed, Run, installed  # noqa: F401 - the module's helm install

pytestmark = [pytest.mark.cluster, pytest.mark.images, pytest.mark.trainer, pytest.mark.slow]

KUEUE = ("kueue.x-k8s.io", "v1beta2")
FLAVOR, CLUSTER_QUEUE, QUEUE = "sft-test-gpu", "sft-test-gpus", "team-gpus"
LOW, HIGH = "sft-test-low", "sft-test-high"
GPU_QUOTA = 2
CHECKPOINT_EVERY = 50


@pytest.fixture(scope="module")
def kueue(real_node):
    """Kueue in the real node's cluster for this module; removed after (its webhooks first)."""
    devcluster_kueue.install(real_node.state_dir, timeout=180)
    yield real_node
    custom = client.CustomObjectsApi(real_node.api)
    # The test namespaces are deleted by now; Kueue must outlive their Workloads (it holds their finalizers).
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and custom.list_cluster_custom_object(*KUEUE, "workloads")["items"]:
        time.sleep(1)
    devcluster_kueue.uninstall(real_node.state_dir)


@pytest.fixture(scope="module")
def queue(kueue, installed):
    """A ResourceFlavor, a ClusterQueue with a GPU quota that preempts lower priorities, a LocalQueue in the
    jobs' namespace, and two PriorityClasses (what a platform team creates)."""
    api = installed.cluster.api
    custom = client.CustomObjectsApi(api)
    scheduling = client.SchedulingV1Api(api)
    for name, value in ((LOW, 100), (HIGH, 1000)):
        scheduling.create_priority_class({"metadata": {"name": name}, "value": value,
                                          "description": "SFT Operator Kueue test"})
    custom.create_cluster_custom_object(*KUEUE, "resourceflavors", {
        "apiVersion": "/".join(KUEUE), "kind": "ResourceFlavor", "metadata": {"name": FLAVOR}, "spec": {}})
    custom.create_cluster_custom_object(*KUEUE, "clusterqueues", {
        "apiVersion": "/".join(KUEUE), "kind": "ClusterQueue", "metadata": {"name": CLUSTER_QUEUE},
        "spec": {"namespaceSelector": {},
                 "preemption": {"withinClusterQueue": "LowerPriority"},
                 "resourceGroups": [{"coveredResources": ["nvidia.com/gpu"], "flavors": [
                     {"name": FLAVOR, "resources": [{"name": "nvidia.com/gpu", "nominalQuota": GPU_QUOTA}]}]}]}})
    custom.create_namespaced_custom_object(*KUEUE, installed.work, "localqueues", {
        "apiVersion": "/".join(KUEUE), "kind": "LocalQueue", "metadata": {"name": QUEUE},
        "spec": {"clusterQueue": CLUSTER_QUEUE}})
    yield installed
    for delete in (lambda: custom.delete_cluster_custom_object(*KUEUE, "clusterqueues", CLUSTER_QUEUE),
                   lambda: custom.delete_cluster_custom_object(*KUEUE, "resourceflavors", FLAVOR),
                   lambda: scheduling.delete_priority_class(LOW), lambda: scheduling.delete_priority_class(HIGH)):
        delete()


def workload_of(installed: Installed, name: str) -> dict | None:
    """Kueue's Workload for the trainer Job of SFTJob ``name``."""
    items = client.CustomObjectsApi(installed.cluster.api).list_namespaced_custom_object(
        *KUEUE, installed.work, "workloads")["items"]
    for item in items:
        if any(r.get("kind") == "Job" and r.get("name") == name for r in item["metadata"].get("ownerReferences") or []):
            return item
    return None


def condition(obj: dict | None, kind: str) -> dict:
    return next((c for c in ((obj or {}).get("status") or {}).get("conditions") or [] if c["type"] == kind), {})


def queued_condition(status: dict) -> dict:
    return condition({"status": status}, "Queued")


def spec(max_steps: int, priority: str, **extra) -> dict:
    return {"hyperparameters": {"maxSteps": max_steps}, "evaluation": {"strategy": "no"},
            # backoffLimit 0: a preemption counted as a failure would fail the job.
            "runPolicy": {"backoffLimit": 0},
            "scheduling": {"queueName": QUEUE, "priorityClassName": priority}, **extra}


def test_kueue_queues_by_gpu_quota_admits_gangs_whole_and_preempts_into_a_checkpoint_and_resume(queue, tmp_path):
    installed = queue
    batch = client.BatchV1Api(installed.cluster.api)
    wait_for = installed.cluster.wait_for

    # low: admitted within the quota, trains and checkpoints.
    low_applied = installed.apply("low", tmp_path, **spec(
        400, LOW, resources={"gpusPerNode": 2},
        checkpointing={"strategy": "steps", "steps": CHECKPOINT_EVERY, "keep": 2}))
    wait_for(lambda: installed.status("low").get("phase") == "Running", 300, "low Running",
             interval=0.5)
    assert condition(workload_of(installed, "low"), "Admitted").get("status") == "True"

    # gang: 2 pods x 1 GPU, no quota left -> Queued with Kueue's own message, and no pod.
    installed.apply("gang", tmp_path, **spec(30, LOW, resources={"nodes": 2, "gpusPerNode": 1}))

    def gang_waits_with_kueues_message():
        waiting = condition(workload_of(installed, "gang"), "QuotaReserved")
        status = installed.status("gang")
        return (waiting.get("status") == "False" and waiting.get("message")
                and status.get("phase") == "Queued" and waiting["message"] in queued_condition(status)["message"])

    wait_for(gang_waits_with_kueues_message, 60, "gang Queued with Kueue's message", interval=0.5)
    status = installed.status("gang")
    print(f"\ngang: {status['phase']}: {queued_condition(status)['message']}")
    assert "nvidia.com/gpu" in queued_condition(status)["message"]
    assert batch.read_namespaced_job("gang", installed.work).spec.suspend is True
    assert installed.pods("gang") == []

    # A checkpoint of low's exists; then high arrives and preempts it.
    checkpoints = installed.models / "low" / "checkpoints"
    wait_for(lambda: list(checkpoints.glob("*/COMPLETE")), 300, "a checkpoint of low", interval=0.5)
    step_at_preemption = trainer_step(installed, "low")  # the trainer's own log: the status may lag
    assert step_at_preemption >= CHECKPOINT_EVERY
    installed.apply("high", tmp_path, **spec(30, HIGH, resources={"gpusPerNode": 1}))

    def low_preempted():
        status = installed.status("low")
        return status.get("phase") == "Queued" and queued_condition(status).get("reason") == "Preempted"

    wait_for(low_preempted, 120, "low Queued as Preempted", interval=0.5)
    low_status = installed.status("low")
    print(f"low at step {step_at_preemption}: {low_status['phase']}: {queued_condition(low_status)['message']}")
    assert "Preempted" in queued_condition(low_status)["message"], low_status

    # While high runs, 1 of the 2 GPUs is free: the gang still gets no pod (never half of it).
    gang_pods_while_high_ran = set()
    high = Run("high")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        high.status = installed.status("high")
        gang_pods_while_high_ran |= {p.metadata.name for p in installed.pods("gang")}
        if high.status.get("phase") in ("Succeeded", "Failed"):
            break
        time.sleep(0.5)
    assert high.status.get("phase") == "Succeeded", installed.explain("high", high.status)
    assert gang_pods_while_high_ran == set()

    # high is done: gang is admitted, as one podset of 2, and trains on both pods.
    gang = installed.follow("gang", time.monotonic(), timeout=600)
    assert gang.status.get("phase") == "Succeeded", installed.explain("gang", gang.status)
    admission = (workload_of(installed, "gang").get("status") or {}).get("admission") or {}
    assert [a.get("count") for a in admission.get("podSetAssignments") or []] == [2], admission
    indexes = sorted(p.metadata.annotations["batch.kubernetes.io/job-completion-index"] for p in installed.pods("gang"))
    assert indexes == ["0", "1"]

    # low is admitted again and resumes from the checkpoint it saved when preempted.
    low = installed.follow("low", low_applied, timeout=900)
    explain = installed.explain("low", low.status)
    assert low.status.get("phase") == "Succeeded", explain
    assert low.status["progress"]["step"] == 400, explain
    resumed = [s for s in (resumed_step(installed, p.metadata.name) for p in installed.pods("low")) if s is not None]
    assert resumed and resumed[0] >= step_at_preemption - CHECKPOINT_EVERY, (resumed, step_at_preemption, explain)
    job = batch.read_namespaced_job("low", installed.work)
    assert not job.status.failed, f"the preemption counted against the backoff: {job.status}"
    print(f"low: preempted at step {step_at_preemption}, resumed from step {resumed[0]}, Succeeded; "
          f"Job failed count {job.status.failed or 0}")
