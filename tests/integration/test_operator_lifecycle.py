"""The operator against the real control plane, on kwok GPU nodes.

The operator runs as a subprocess (`python -m sft_operator`), as it runs in production, so that
it can be SIGKILLed in the crash test; one process watching every namespace serves the tests of this
module and of test_operator_faults.py (the `operator` fixture), each test in a namespace of its own.

How tests make kwok pods fail: the kwok stages of the dev cluster read pod annotations
(`sft.dev/kwok-exit-code`, `sft.dev/kwok-oomkill`, `sft.dev/kwok-hold`, `sft.dev/kwok-delay`).
An SFTJob has no pod-annotation field, and a Job's pod template is immutable -- except while the
Job is suspended and has never started, when Kubernetes lets a queue controller (Kueue) change
the template's labels and annotations. The tests do what Kueue does: create the SFTJob with
`runPolicy.suspend: true`, annotate the suspended Job's template, then resume the SFTJob. That
also exercises suspend and resume on every such test.

Image pulls: kwok pulls no images, so the image-pull test plays the kubelet and writes the
container status a kubelet writes for an image it cannot pull (ErrImagePull).
"""

from __future__ import annotations

import copy
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from kubernetes.client.exceptions import ApiException

from sft_operator.core.render import LABEL_JOB

from support import REPO

from .sftjob_cluster import PULL_GRACE, cond, manifest

pytestmark = pytest.mark.cluster


# ---- the happy path ------------------------------------------------------------------------------


def test_apply_creates_children_runs_and_succeeds(control_plane, operator, k8s):
    k8s.launch("happy", {"sft.dev/kwok-delay": "3s"})
    sftjob = k8s.get("happy")
    uid = sftjob["metadata"]["uid"]

    for obj in (k8s.core.read_namespaced_config_map("happy-config", k8s.ns), k8s.core.read_namespaced_service("happy", k8s.ns),
                k8s.job("happy")):
        (ref,) = obj.metadata.owner_references
        assert (ref.kind, ref.uid, ref.controller, ref.block_owner_deletion) == ("SFTJob", uid, True, True)

    running = k8s.wait_phase("happy", "Running", timeout=30)
    assert cond(running, "Running")["status"] == "True"
    assert running["startTime"]
    sftctl = [sys.executable, "-m", "sft_operator.cli.sftctl"]
    kubeconfig = f"--kubeconfig={control_plane.kubeconfig}"
    watch = subprocess.Popen([*sftctl, "watch", "happy", "-n", k8s.ns, kubeconfig], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=REPO)  # follows it until it finishes

    wait = control_plane.kubectl("wait", "-n", k8s.ns, "--for=condition=Succeeded", "sftjob/happy", "--timeout=60s", check=False)
    assert wait.returncode == 0, wait.stderr
    out, err = watch.communicate(timeout=60)
    assert watch.returncode == 0 and "Succeeded" in out, err
    shown = subprocess.run([*sftctl, "status", "happy", "-n", k8s.ns, kubeconfig], capture_output=True, text=True,
                           cwd=REPO, timeout=60)
    assert shown.returncode == 0 and f"{k8s.ns}/happy" in shown.stdout and "Succeeded" in shown.stdout, shown.stderr
    missing = subprocess.run([*sftctl, "status", "nope", "-n", k8s.ns, kubeconfig], capture_output=True, text=True,
                             cwd=REPO, timeout=60)
    assert missing.returncode == 2 and missing.stderr.strip() == f"SFTJob {k8s.ns}/nope not found"

    status = k8s.status("happy")
    assert status["phase"] == "Succeeded"
    assert status["jobName"] == "happy" and status["restarts"] == 0
    assert status["effectiveBatchSize"] == 4 * 4 * 8
    assert status["completionTime"] >= status["startTime"]
    succeeded = cond(status, "Succeeded")
    assert (succeeded["status"], succeeded["reason"]) == ("True", "Completed")
    assert succeeded["observedGeneration"] == k8s.get("happy")["metadata"]["generation"]
    assert cond(status, "Failed")["status"] == "False"
    assert cond(status, "Created")["status"] == "True"

    # Events only for what a person acts on: here the advice on a full fine-tune, one Warning.
    control_plane.wait_for(lambda: "Advice" in k8s.event_reasons("happy"), 15, "the advice event")
    (advice,) = k8s.events("happy")
    assert advice.type == "Warning" and "catastrophic forgetting" in advice.message

    got = control_plane.kubectl("get", "sftjobs", "-n", k8s.ns)
    header, row = got.stdout.splitlines()[:2]
    assert header.split() == ["NAME", "PHASE", "PROGRESS", "LOSS", "EVALUATION", "AGE"]
    assert row.split()[:2] == ["happy", "Succeeded"]
    assert k8s.wide_reason("happy") == "Completed"

    meta = k8s.get("happy")["metadata"]
    assert not meta.get("finalizers") and not meta.get("annotations")  # the operator writes only status
    lines = operator.metrics().splitlines()
    assert f'sft_jobs_created_total{{namespace="{k8s.ns}"}} 1.0' in lines
    (finished,) = [line for line in lines if line.startswith("sft_jobs_finished_total{") and f'namespace="{k8s.ns}"' in line]
    assert 'result="Succeeded"' in finished and 'reason="Completed"' in finished and finished.endswith(" 1.0")


# ---- failures, each with its own reason ------------------------------------------------------


def test_oomkilled(operator, k8s):
    k8s.launch("oom", {"sft.dev/kwok-oomkill": "true"})
    status = k8s.wait_phase("oom", "Failed")
    failed = cond(status, "Failed")
    assert failed["reason"] == "OOMKilled"
    assert "memory" in failed["message"]


def test_non_retriable_exit_code_is_a_data_error(operator, k8s):
    message = "DataError: /data/train.jsonl row 17: missing field 'response'"
    k8s.launch("baddata", {"sft.dev/kwok-exit-code": "65", "sft.dev/kwok-message": message}, runPolicy={"backoffLimit": 3})
    status = k8s.wait_phase("baddata", "Failed")
    failed = cond(status, "Failed")
    assert failed["reason"] == "DataError"
    assert "row 17" in failed["message"]
    assert status["restarts"] == 0  # podFailurePolicy failed it at once despite backoffLimit 3
    assert len(k8s.pods("baddata")) == 1


def test_image_that_cannot_be_pulled_fails_after_the_grace_period(operator, k8s):
    k8s.launch("nopull", {"sft.dev/kwok-hold": "true"}, image="registry.invalid/no/such:image")
    k8s.wait_phase("nopull", "Running", timeout=30)
    (pod,) = k8s.pods("nopull")
    # The kubelet's report for an image it cannot pull.
    k8s.core.patch_namespaced_pod_status(pod.metadata.name, k8s.ns, {"status": {
        "phase": "Pending",
        "containerStatuses": [{
            "name": "trainer", "image": "registry.invalid/no/such:image", "imageID": "", "ready": False,
            "restartCount": 0, "started": False,
            "state": {"waiting": {"reason": "ErrImagePull", "message": 'failed to resolve reference "registry.invalid/no/such:image"'}},
        }],
    }})
    pending = k8s.wait_phase("nopull", "Pending", "Failed", timeout=15)
    if pending["phase"] == "Pending":
        assert cond(pending, "Running")["reason"] == "ErrImagePull"
    status = k8s.wait_phase("nopull", "Failed", timeout=PULL_GRACE + 30)
    failed = cond(status, "Failed")
    assert failed["reason"] == "ImagePullFailed"
    assert "registry.invalid/no/such:image" in failed["message"]
    # The operator stopped the Job: a pod that never pulls must not hold 8 GPUs forever.
    k8s.cp.wait_for(lambda: k8s.job("nopull").spec.suspend, 15, "Job suspended")


def test_sixteen_gpus_on_eight_gpu_nodes_stays_pending_with_the_scheduler_message(operator, k8s):
    k8s.create(manifest("toobig", resources={"gpusPerNode": 16}))
    status = k8s.cp.wait_for(
        lambda: (s := k8s.status("toobig")).get("phase") == "Pending" and cond(s, "Running")["reason"] == "Unschedulable" and s,
        45, "Unschedulable",
    )
    assert "nvidia.com/gpu" in cond(status, "Running")["message"] and status["reason"] == "Unschedulable"
    assert cond(status, "Failed")["status"] == "False"
    # That it stays Pending past every grace period is tests/unit/test_writer.py's (an hour on a fake clock).


def test_deadline(operator, k8s):
    k8s.launch("late", {"sft.dev/kwok-hold": "true"}, runPolicy={"activeDeadlineSeconds": 3})
    status = k8s.wait_phase("late", "Failed", timeout=45)
    assert cond(status, "Failed")["reason"] == "DeadlineExceeded"


def test_pod_deleted_mid_run_is_a_restart_and_the_job_goes_on(control_plane, operator, k8s):
    k8s.launch("bumpy", {"sft.dev/kwok-delay": "6s"}, runPolicy={"backoffLimit": 2})
    k8s.wait_phase("bumpy", "Running", timeout=30)
    (pod,) = k8s.pods("bumpy")
    k8s.core.delete_namespaced_pod(pod.metadata.name, k8s.ns)
    k8s.kubelet_terminates(pod.metadata.name)
    restarted = k8s.cp.wait_for(lambda: (s := k8s.status("bumpy")).get("restarts") == 1 and s, 30, "restart counted")
    assert restarted["phase"] in ("Restarting", "Running")
    status = k8s.wait_phase("bumpy", "Succeeded", "Failed", timeout=60)
    assert status["phase"] == "Succeeded"
    assert status["restarts"] == 1
    control_plane.wait_for(lambda: "Restarted" in k8s.event_reasons("bumpy"), 15, "Restarted event")


# ---- suspend, resume, Kueue --------------------------------------------------------------------


def test_suspend_and_resume_with_the_kueue_label(operator, k8s):
    k8s.launch("pausable", {"sft.dev/kwok-hold": "true"}, scheduling={"queueName": "gpu-queue"})
    job = k8s.job("pausable")
    assert job.metadata.labels["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    k8s.wait_phase("pausable", "Running", timeout=30)
    assert k8s.job("pausable").spec.suspend is False

    # Someone (a GitOps tool, a person) labels the Job: the operator leaves fields it does not own alone.
    k8s.batch.patch_namespaced_job("pausable", k8s.ns, {"metadata": {"labels": {"team": "research"}}})

    k8s.patch_spec("pausable", {"runPolicy": {"suspend": True}})
    status = k8s.wait_phase("pausable", "Suspended", timeout=30)
    assert cond(status, "Suspended")["status"] == "True"
    assert k8s.job("pausable").spec.suspend is True
    k8s.cp.wait_for(lambda: not [p for p in k8s.pods("pausable") if p.status.phase == "Running"], 30, "pods removed")

    k8s.patch_spec("pausable", {"runPolicy": {"suspend": False}})
    k8s.wait_phase("pausable", "Running", timeout=30)
    job = k8s.job("pausable")
    assert job.spec.suspend is False
    assert job.metadata.labels["team"] == "research"


# ---- lifecycle ---------------------------------------------------------------------------------


def test_ttl_seconds_after_finished_deletes_the_sftjob_and_gc_its_children(operator, k8s):
    k8s.create(manifest("shortlived", runPolicy={"ttlSecondsAfterFinished": 2}))
    k8s.wait_phase("shortlived", "Succeeded", timeout=45)

    def gone():
        try:
            k8s.get("shortlived")
        except ApiException as exc:
            return exc.status == 404
        return False

    k8s.cp.wait_for(gone, 30, "SFTJob deleted by its TTL")
    k8s.cp.wait_for(lambda: not k8s.batch.list_namespaced_job(k8s.ns).items, 30, "Job garbage-collected")


def test_delete_removes_children_and_leaves_no_finalizer(operator, k8s):
    k8s.create(manifest("doomed", runPolicy={"suspend": True}))
    k8s.wait_phase("doomed", "Suspended", timeout=30)
    assert not k8s.get("doomed")["metadata"].get("finalizers")
    deleted = k8s.cp.kubectl("delete", "sftjob", "doomed", "-n", k8s.ns, "--wait=true", "--timeout=20s", check=False)
    assert deleted.returncode == 0, deleted.stderr

    def children_gone():
        return (not k8s.batch.list_namespaced_job(k8s.ns).items
                and not k8s.core.list_namespaced_service(k8s.ns).items
                and not [c for c in k8s.core.list_namespaced_config_map(k8s.ns).items if c.metadata.name == "doomed-config"])

    k8s.cp.wait_for(children_gone, 30, "children garbage-collected")


def test_deletion_completes_while_the_operator_is_down(operator, k8s):
    k8s.create(manifest("orphaned", runPolicy={"suspend": True}))
    k8s.wait_phase("orphaned", "Suspended", timeout=30)
    operator.stop()
    deleted = k8s.cp.kubectl("delete", "sftjob", "orphaned", "-n", k8s.ns, "--timeout=15s", check=False)
    assert deleted.returncode == 0, deleted.stderr


def test_quota_rejection_shows_in_status_then_recovers(operator, k8s):
    k8s.core.create_namespaced_resource_quota(k8s.ns, {"metadata": {"name": "no-jobs"}, "spec": {"hard": {"count/jobs.batch": "0"}}})
    k8s.cp.wait_for(lambda: k8s.core.read_namespaced_resource_quota("no-jobs", k8s.ns).status.hard, 15, "quota active")
    k8s.create(manifest("overquota"))

    def rejected():
        status = k8s.status("overquota")
        return status.get("conditions") and cond(status, "Created")["reason"] == "QuotaExceeded" and status

    status = k8s.cp.wait_for(rejected, 30, "QuotaExceeded in status")
    created = cond(status, "Created")
    assert created["status"] == "False" and "exceeded quota" in created["message"]
    assert status["phase"] == "Pending"
    assert "QuotaExceeded" in k8s.event_reasons("overquota")

    k8s.core.delete_namespaced_resource_quota("no-jobs", k8s.ns)
    status = k8s.wait_phase("overquota", "Succeeded", timeout=60)
    assert cond(status, "Created")["status"] == "True"


def test_gpu_quota_that_blocks_the_pods_shows_in_status(operator, k8s):
    k8s.core.create_namespaced_resource_quota(
        k8s.ns, {"metadata": {"name": "gpus"}, "spec": {"hard": {"requests.nvidia.com/gpu": "4"}}}
    )
    k8s.cp.wait_for(lambda: k8s.core.read_namespaced_resource_quota("gpus", k8s.ns).status.hard, 15, "quota active")
    k8s.create(manifest("greedy"))  # 8 GPUs: the Job is created, its pod is not

    def blocked():
        status = k8s.status("greedy")
        return status.get("conditions") and cond(status, "Running")["reason"] == "QuotaExceeded" and status

    status = k8s.cp.wait_for(blocked, 30, "QuotaExceeded from the Job's FailedCreate event")
    assert status["phase"] == "Pending"
    assert "requests.nvidia.com/gpu" in cond(status, "Running")["message"]
    assert cond(status, "Created")["status"] == "True"


# ---- crash safety ------------------------------------------------------------------------------


def test_crash_safety_fifty_jobs_with_the_operator_killed_while_creating(operator, k8s):
    starts = operator.starts  # the operator is shared: earlier tests may have (re)started it
    names = [f"crash-{i:02d}" for i in range(50)]
    template = manifest("x", resources={"gpusPerNode": 1})
    created: list[str] = []

    def create_all():
        for name in names:
            doc = copy.deepcopy(template)
            doc["metadata"]["name"] = name
            k8s.create(doc)
            created.append(name)
            time.sleep(0.08)

    creator = threading.Thread(target=create_all)
    creator.start()
    kills = 0
    try:
        for pause in (0.7, 0.4, 0.9, 0.5):  # once it is up and busy creating, whatever it is doing
            time.sleep(pause)
            operator.kill()
            kills += 1
            operator.start()
    finally:
        creator.join(60)
    assert len(created) == 50 and kills == 4
    operator.wait_healthy()

    def all_terminal():
        phases = {n: (k8s.status(n).get("phase")) for n in names}
        return all(p in ("Succeeded", "Failed") for p in phases.values()) and phases

    phases = k8s.cp.wait_for(all_terminal, 180, "every SFTJob terminal", interval=2)
    assert set(phases.values()) == {"Succeeded"}
    jobs = k8s.batch.list_namespaced_job(k8s.ns).items
    per_owner: dict[str, int] = {}
    for job in jobs:
        per_owner[job.metadata.labels[LABEL_JOB]] = per_owner.get(job.metadata.labels[LABEL_JOB], 0) + 1
    assert per_owner == {n: 1 for n in names}
    uids = {n: k8s.get(n)["metadata"]["uid"] for n in names}
    for job in jobs:
        assert job.metadata.owner_references[0].uid == uids[job.metadata.labels[LABEL_JOB]]
    assert operator.starts == starts + 4


def test_help_and_liveness(operator):
    out = subprocess.run([sys.executable, "-m", "sft_operator", "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "--pod-start-grace-seconds" in out.stdout and "SFT_WATCH_NAMESPACES" in out.stdout
    with urllib.request.urlopen(f"http://127.0.0.1:{operator.ports['health']}/healthz", timeout=5) as resp:
        assert resp.status == 200
