"""The operator under faults, on the real control plane (kwok GPU nodes, OwnerReferencesPermissionEnforcement
on): one test per defect of issue #12, each failing on the operator before it and passing after.

Where kwok does not act like a kubelet, a test writes what a kubelet writes (a container that cannot
be created, a FailedMount event); where a test needs the API server to refuse a write, it installs a
ValidatingAdmissionPolicy (the API server's own CEL admission) for its namespace only.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from kubernetes.client.exceptions import ApiException

from sft_operator.api import GROUP, PLURAL, VERSION
from sft_operator.core.render import LABEL_JOB, RenderOptions
from sft_operator.runtime.settings import OperatorSettings

from support import OperatorProcess
from tls_certs import self_signed

from .sftjob_cluster import PULL_GRACE, Cluster, cond, manifest, reconciles

pytestmark = pytest.mark.cluster


def gone(read) -> bool:
    try:
        read()
    except ApiException as exc:
        return exc.status == 404
    return False


def owner_uid(obj) -> str | None:
    refs = [r for r in obj.metadata.owner_references or [] if r.controller]
    return refs[0].uid if refs else None


# ---- 1. it never adopts what it did not create ----------------------------------------------------


def test_a_name_taken_by_an_object_we_did_not_create_fails_the_job_and_the_object_is_left_alone(operator, k8s):
    # A production Service that happens to have the SFTJob's name.
    k8s.core.create_namespaced_service(k8s.ns, {"metadata": {"name": "chatbot", "labels": {"app": "chatbot"}},
                                                "spec": {"ports": [{"port": 80}], "selector": {"app": "chatbot"}}})
    k8s.create(manifest("chatbot"))
    status = k8s.wait_phase("chatbot", "Failed", timeout=30)
    failed = cond(status, "Failed")
    assert failed["reason"] == "NameConflict" and f"Service {k8s.ns}/chatbot" in failed["message"]
    assert status["reason"] == "NameConflict" and k8s.wide_reason("chatbot") == "NameConflict"
    service = k8s.core.read_namespaced_service("chatbot", k8s.ns)
    assert not service.metadata.owner_references and service.metadata.labels == {"app": "chatbot"}
    assert gone(lambda: k8s.job("chatbot"))  # nothing was started under a name it does not own
    k8s.custom.delete_namespaced_custom_object(GROUP, VERSION, k8s.ns, PLURAL, "chatbot")
    k8s.cp.wait_for(lambda: gone(lambda: k8s.core.read_namespaced_config_map("chatbot-config", k8s.ns)), 90,
                    "our own ConfigMap garbage-collected")  # (a fresh cluster's GC learns new CRDs within 30 s)
    assert k8s.core.read_namespaced_service("chatbot", k8s.ns).metadata.uid == service.metadata.uid  # survived

    # The orphaned children of an earlier SFTJob of the same name (deleted with --cascade=orphan): our
    # labels, no controller. Reusing them would reuse the old config and the old Complete condition.
    k8s.create(manifest("reused", runPolicy={"suspend": True}))
    k8s.wait_phase("reused", "Suspended", timeout=30)
    k8s.custom.delete_namespaced_custom_object(GROUP, VERSION, k8s.ns, PLURAL, "reused",
                                               body={"propagationPolicy": "Orphan"})
    k8s.cp.wait_for(lambda: not k8s.job("reused").metadata.owner_references, 30, "the old Job orphaned")
    k8s.cp.wait_for(lambda: gone(lambda: k8s.get("reused")), 30, "the old SFTJob gone")  # (its orphan finalizer)
    k8s.create(manifest("reused"))
    failed = cond(k8s.wait_phase("reused", "Failed", timeout=30), "Failed")
    assert failed["reason"] == "NameConflict" and "reused" in failed["message"]
    assert not k8s.job("reused").metadata.owner_references  # still nobody's


def test_a_foreign_object_with_our_label_does_not_fail_a_running_job(operator, k8s):
    """Issue #19 defect 2: a TensorBoard Service that copies the trainer pods' selector into its labels, and
    someone's notes ConfigMap with the same label, are not children: they never take a child's place."""
    k8s.launch("board", {"sft.dev/kwok-hold": "true"})
    k8s.wait_phase("board", "Running", timeout=30)
    uid = k8s.get("board")["metadata"]["uid"]
    k8s.core.create_namespaced_service(k8s.ns, {"metadata": {"name": "board-tensorboard", "labels": {LABEL_JOB: "board"}},
                                                "spec": {"ports": [{"port": 6006}], "selector": {LABEL_JOB: "board"}}})
    k8s.core.create_namespaced_config_map(k8s.ns, {"metadata": {"name": "board-notes", "labels": {LABEL_JOB: "board"}},
                                                   "data": {"notes": "lr sweep 3"}})
    # Our ConfigMap deleted after that: its DELETED event comes behind the notes' ADDED on the same watch, so
    # the operator reconciles the job with the foreign objects in view (as its periodic resync does).
    old = k8s.core.read_namespaced_config_map("board-config", k8s.ns).metadata.uid
    k8s.core.delete_namespaced_config_map("board-config", k8s.ns)

    def recreated():
        try:
            config = k8s.core.read_namespaced_config_map("board-config", k8s.ns)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return config.metadata.uid != old and owner_uid(config) == uid

    k8s.cp.wait_for(recreated, 30, "our ConfigMap recreated")
    status = k8s.status("board")
    assert status["phase"] == "Running" and cond(status, "Created")["reason"] == "ChildrenCreated"
    assert not k8s.job("board").spec.suspend
    assert "NameConflict" not in k8s.event_reasons("board")


# ---- 2. every child converges, with back-off ------------------------------------------------------


def test_every_deleted_child_comes_back_and_a_failed_recreate_is_retried(operator, k8s):
    k8s.launch("phoenix", {"sft.dev/kwok-hold": "true"})
    k8s.wait_phase("phoenix", "Running", timeout=30)
    uid = k8s.get("phoenix")["metadata"]["uid"]
    old = {"cm": k8s.core.read_namespaced_config_map("phoenix-config", k8s.ns).metadata.uid,
           "svc": k8s.core.read_namespaced_service("phoenix", k8s.ns).metadata.uid}
    k8s.core.delete_namespaced_config_map("phoenix-config", k8s.ns)
    k8s.core.delete_namespaced_service("phoenix", k8s.ns)

    def recreated(read, key):
        obj = read()
        return obj.metadata.uid != old[key] and owner_uid(obj) == uid and obj

    k8s.cp.wait_for(lambda: recreated(lambda: k8s.core.read_namespaced_config_map("phoenix-config", k8s.ns), "cm"),
                    30, "the ConfigMap recreated")
    k8s.cp.wait_for(lambda: recreated(lambda: k8s.core.read_namespaced_service("phoenix", k8s.ns), "svc"),
                    30, "the Service recreated")

    # The Job is deleted while a quota forbids a new one: the recreate fails, and is retried until it works.
    k8s.core.create_namespaced_resource_quota(k8s.ns, {"metadata": {"name": "no-jobs"},
                                                       "spec": {"hard": {"count/jobs.batch": "1"}}})
    k8s.cp.wait_for(lambda: k8s.core.read_namespaced_resource_quota("no-jobs", k8s.ns).status.used, 15, "quota active")
    k8s.core.patch_namespaced_resource_quota("no-jobs", k8s.ns, {"spec": {"hard": {"count/jobs.batch": "0"}}})
    old_job = k8s.job("phoenix").metadata.uid
    k8s.batch.delete_namespaced_job("phoenix", k8s.ns, propagation_policy="Background")

    def refused():
        created = cond(k8s.status("phoenix"), "Created")
        return created["status"] == "False" and created["reason"] == "QuotaExceeded"

    k8s.cp.wait_for(refused, 30, "the refused recreate in status")
    k8s.core.delete_namespaced_resource_quota("no-jobs", k8s.ns)
    job = k8s.cp.wait_for(lambda: (j := k8s.job("phoenix")).metadata.uid != old_job and j, 40, "the Job recreated")
    assert owner_uid(job) == uid
    assert cond(k8s.wait_phase("phoenix", "Running", "Succeeded", timeout=30), "Created")["status"] == "True"


# ---- 3. pods that never start are named and failed; a shared ReadWriteOnce claim is warned about ----


@pytest.mark.parametrize("problem", ["CreateContainerConfigError", "FailedMount", "MultiAttach"])
def test_a_pod_that_cannot_start_is_named_then_failed_and_its_gpus_freed(operator, k8s, problem):
    # A model in the image: no download. A pod whose init containers ran has mounted its volumes, so for a
    # volume problem kwok leaves the pods Pending once scheduled, as a kubelet that cannot mount them does.
    spec = {"model": {"source": "/models/qwen2.5-0.5b"}}
    hold = {"sft.dev/kwok-hold": "true"}
    if problem != "CreateContainerConfigError":
        hold["sft.dev/kwok-unstarted"] = "true"
    if problem == "MultiAttach":  # two nodes reading one ReadWriteOnce claim: the second cannot attach it
        k8s.core.create_namespaced_persistent_volume_claim(k8s.ns, {
            "metadata": {"name": "shared"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
        spec.update(resources={"nodes": 2, "gpusPerNode": 1}, dataset={"train": {"source": "pvc://shared/train.jsonl"}})
    k8s.launch("stuck", hold, **spec)
    if problem == "CreateContainerConfigError":
        k8s.wait_phase("stuck", "Running", timeout=40)
    else:
        pods = 2 if problem == "MultiAttach" else 1
        k8s.cp.wait_for(lambda: len(ps := k8s.pods("stuck")) == pods and all(p.spec.node_name for p in ps), 40,
                        "the pods scheduled")
    pod = sorted(k8s.pods("stuck"), key=lambda p: p.metadata.name)[-1]
    if problem == "CreateContainerConfigError":
        k8s.kubelet_reports_waiting(pod.metadata.name, problem, f"couldn't find key tokn in Secret {k8s.ns}/hf-token")
        expected = "hf-token"
    else:
        k8s.kubelet_reports_waiting(pod.metadata.name, "ContainerCreating")
        if problem == "FailedMount":
            expected = 'MountVolume.SetUp failed for volume "config" : configmap "stuck-config" not found'
            k8s.report_pod_event(pod, "FailedMount", expected)
        else:
            expected = 'Multi-Attach error for volume "pvc-shared" Volume is already used by pod(s) stuck-0-x'
            k8s.report_pod_event(pod, "FailedAttachVolume", expected, component="attachdetach-controller")

    def named():
        status = k8s.status("stuck")
        return status.get("reason") in (problem, ) and status

    if problem == "CreateContainerConfigError":  # within the grace period: named, not yet failed
        waiting = k8s.cp.wait_for(named, 20, f"{problem} in status")
        assert waiting["phase"] == "Pending" and expected in cond(waiting, "Running")["message"]
    failed = cond(k8s.wait_phase("stuck", "Failed", timeout=PULL_GRACE + 40), "Failed")
    assert failed["reason"] == problem and expected in failed["message"]
    k8s.cp.wait_for(lambda: k8s.job("stuck").spec.suspend, 20, "the Job suspended (its pods hold GPUs)")
    if problem == "MultiAttach":
        (advice,) = [e for e in k8s.events("stuck") if e.reason == "Advice"]
        assert advice.type == "Warning" and "ReadWriteOnce" in advice.message and "shared" in advice.message


# ---- 4. storage: the cache claim is ours alone; what a cluster cannot run fails before any pod ------


def test_storage_a_cluster_cannot_use_fails_before_any_pod_and_the_cache_claim_is_ours_alone(operator, k8s):
    # The hub model is fetched into the claim the operator creates, owned by the SFTJob (deleted with it).
    k8s.create(manifest("cached", runPolicy={"suspend": True}))
    k8s.wait_phase("cached", "Suspended", timeout=30)
    claim = k8s.core.read_namespaced_persistent_volume_claim("cached-cache", k8s.ns)
    assert owner_uid(claim) == k8s.get("cached")["metadata"]["uid"]
    assert claim.spec.access_modes == ["ReadWriteOnce"] and claim.spec.resources.requests["storage"] == "50Gi"
    assert k8s.job("cached").spec.template.spec.init_containers[0].name == "fetch"

    # A claim named like ours that we did not create is never used (it may hold someone else's data).
    k8s.core.create_namespaced_persistent_volume_claim(k8s.ns, {"metadata": {"name": "taken-cache"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
    k8s.create(manifest("taken"))
    # A local output path would vanish with the pod; two nodes cannot both write a ReadWriteOnce claim.
    k8s.create(manifest("local", output={"destination": "/tmp/out"}))
    k8s.core.create_namespaced_persistent_volume_claim(k8s.ns, {"metadata": {"name": "models"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
    k8s.create(manifest("rwo", resources={"nodes": 2, "gpusPerNode": 1}, output={"destination": "pvc://models/rwo"}))
    expected = {
        "taken": ("NameConflict", f"PersistentVolumeClaim {k8s.ns}/taken-cache already exists"),
        "local": ("InvalidSpec", "spec.output.destination: '/tmp/out' is a local path"),
        "rwo": ("ReadWriteOnceClaim", "PersistentVolumeClaim models is ReadWriteOnce, but spec.resources.nodes is 2"),
    }
    for name, (reason, message) in expected.items():
        failed = cond(k8s.wait_phase(name, "Failed", timeout=30), "Failed")
        assert failed["reason"] == reason and message in failed["message"], failed
        assert k8s.wide_reason(name) == reason
        assert gone(lambda: k8s.job(name))  # no pod ever held a GPU
    assert "use a ReadWriteMany claim, or write the output to s3://" in cond(k8s.status("rwo"), "Failed")["message"]
    assert not k8s.core.read_namespaced_persistent_volume_claim("taken-cache", k8s.ns).metadata.owner_references


# ---- 5. the final outcome survives an operator restart ----------------------------------------------


RESULT = ('{"outputModel":"/tmp/out/model","bestCheckpoint":"/tmp/out/checkpoints/checkpoint-40","steps":50,'
          '"totalSteps":50,"epochs":3.0,"trainLoss":0.61,"evalLoss":0.72,"bestEvalLoss":0.7}')


def test_the_result_is_read_from_the_termination_message_even_across_a_restart(operator, k8s):
    k8s.launch("durable", {"sft.dev/kwok-hold": "true"})
    k8s.wait_phase("durable", "Running", timeout=30)
    (pod,) = k8s.pods("durable")
    operator.stop()  # the trainer's final progress report is lost with it
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    k8s.core.patch_namespaced_pod_status(pod.metadata.name, k8s.ns, {"status": {"phase": "Succeeded", "containerStatuses": [{
        "name": "trainer", "image": "ghcr.io/sft-operator/trainer:0.1.0", "imageID": "", "ready": False,
        "restartCount": 0, "started": False,
        "state": {"terminated": {"exitCode": 0, "reason": "Completed", "message": RESULT, "startedAt": now,
                                 "finishedAt": now}}}]}})
    k8s.cp.wait_for(lambda: any(c.type == "Complete" and c.status == "True"
                                for c in k8s.job("durable").status.conditions or []), 30, "the Job Complete")
    operator.start()
    status = k8s.wait_phase("durable", "Succeeded", timeout=30)
    assert status["output"] == {"model": "/tmp/out/model", "bestCheckpoint": "/tmp/out/checkpoints/checkpoint-40"}
    assert status["metrics"]["bestEvalLoss"] == 0.7 and status["progress"]["percent"] == 100


# ---- 6. stopping a failed job's Job is retried ------------------------------------------------------


def test_stopping_the_job_of_a_failed_sftjob_is_retried_until_it_works(operator, k8s):
    policy = f"no-suspend-{k8s.ns}"
    k8s.deny(policy, ["UPDATE"], "!(has(object.spec.suspend) && object.spec.suspend == true && "
             "!(has(oldObject.spec.suspend) && oldObject.spec.suspend == true))", "suspending Jobs is paused here")
    k8s.launch("stopme", {"sft.dev/kwok-hold": "true"})
    k8s.wait_phase("stopme", "Running", timeout=30)
    (pod,) = k8s.pods("stopme")
    k8s.kubelet_reports_waiting(pod.metadata.name, "ErrImagePull", "failed to resolve reference")
    assert cond(k8s.wait_phase("stopme", "Failed", timeout=PULL_GRACE + 30), "Failed")["reason"] == "ImagePullFailed"
    # The back-off between the tries is tests/unit/test_manage.py's; here the real API server refuses one.
    k8s.cp.wait_for(lambda: "could not stop its Job" in operator.log_tail(400), 30, "a refused try to stop the Job")
    assert not k8s.job("stopme").spec.suspend  # refused so far...
    k8s.allow(policy)
    k8s.cp.wait_for(lambda: k8s.job("stopme").spec.suspend, 30, "...then retried: the Job suspended")


# ---- 7. an invalid child is final ---------------------------------------------------------------------


def test_a_child_the_api_server_calls_invalid_fails_the_job_with_its_message(operator, k8s):
    policy = f"invalid-{k8s.ns}"
    message = 'spec.template.spec.containers[0].resources.limits[memory]: Invalid value: "64Gii"'
    k8s.deny(policy, ["CREATE"], "false", message, reason="Invalid")  # answers 422, as a bad quantity would
    try:
        probe = {"metadata": {"name": "probe"}, "spec": {"template": {"spec": {"restartPolicy": "Never",
                 "containers": [{"name": "c", "image": "x"}]}}}}

        def denied():
            try:
                k8s.batch.create_namespaced_job(k8s.ns, probe, dry_run="All")
            except ApiException as exc:
                return exc.status == 422
            return False

        k8s.cp.wait_for(denied, 15, "the admission policy in effect")
        k8s.create(manifest("invalid"))
        status = k8s.wait_phase("invalid", "Failed", timeout=30)
        failed = cond(status, "Failed")
        assert failed["reason"] == "InvalidSpec" and "64Gii" in failed["message"]
    finally:
        k8s.allow(policy)
    # That no retry is scheduled is tests/unit/test_manage.py's; here: once the API server would take the
    # Job, a reconcile of the job (a watch event: an annotation) still creates nothing.
    k8s.cp.wait_for(lambda: not denied(), 30, "the admission policy lifted")
    before = reconciles(operator)
    k8s.custom.patch_namespaced_custom_object(GROUP, VERSION, k8s.ns, PLURAL, "invalid",
                                              {"metadata": {"annotations": {"test.sft.dev/poke": "1"}}},
                                              _content_type="application/merge-patch+json")
    k8s.cp.wait_for(lambda: reconciles(operator) > before, 30, "a reconcile after the policy was lifted")
    assert gone(lambda: k8s.job("invalid")) and k8s.status("invalid")["phase"] == "Failed"


# ---- 9. exit 75 from any rank is a disruption ----------------------------------------------------------


def test_interrupted_ranks_do_not_use_up_the_backoff_limit(operator, k8s):
    k8s.launch("preempted", {"sft.dev/kwok-exit-code": "75", "sft.dev/kwok-delay": "1s",
                             "sft.dev/kwok-message": "interrupted: checkpoint saved at step 40"},
               resources={"nodes": 2, "gpusPerNode": 1}, runPolicy={"backoffLimit": 0})

    def restarted():
        status = k8s.status("preempted")
        return status.get("restarts", 0) >= 4 and status

    status = k8s.cp.wait_for(restarted, 60, "both ranks interrupted twice, the job going on")
    assert status["phase"] != "Failed" and cond(status, "Failed")["status"] == "False"
    job = k8s.job("preempted")
    assert not any(c.type == "Failed" and c.status == "True" for c in job.status.conditions or [])
    k8s.patch_spec("preempted", {"runPolicy": {"suspend": True}})


# ---- 10. other holes ---------------------------------------------------------------------------------


def test_a_ttl_edited_after_the_job_finished_is_applied(operator, k8s):
    k8s.create(manifest("keeper", runPolicy={"ttlSecondsAfterFinished": 3600}))
    k8s.wait_phase("keeper", "Succeeded", timeout=45)
    k8s.patch_spec("keeper", {"runPolicy": {"ttlSecondsAfterFinished": 1}})
    k8s.cp.wait_for(lambda: gone(lambda: k8s.get("keeper")), 30, "deleted by the shortened TTL")


def test_a_missing_claim_shows_unschedulable_in_the_reason_column(operator, k8s):
    k8s.create(manifest("noclaim", dataset={"train": {"source": "pvc://missing-claim/train.jsonl"}}))

    def waiting():
        status = k8s.status("noclaim")
        return status.get("reason") == "Unschedulable" and status

    status = k8s.cp.wait_for(waiting, 45, "Unschedulable")
    assert status["phase"] == "Pending" and "missing-claim" in cond(status, "Running")["message"]
    assert k8s.wide_reason("noclaim") == "Unschedulable"


def test_a_rotated_progress_ca_reaches_the_jobs_config_maps(control_plane, namespace, tmp_path):
    ca = tmp_path / "ca.crt"
    (tmp_path / "one").mkdir()
    first, _ = self_signed(tmp_path / "one")
    ca.write_text(first.read_text())
    op = OperatorProcess.plaintext(control_plane.kubeconfig, tmp_path / "operator.log", namespace,
                                   "--progress-ca-file", str(ca), "--reload-seconds", "1")
    op.start()
    try:
        k8s = Cluster(control_plane, namespace)
        k8s.create(manifest("rotated", runPolicy={"suspend": True}))
        k8s.wait_phase("rotated", "Suspended", timeout=30)
        data = lambda: k8s.core.read_namespaced_config_map("rotated-config", namespace).data  # noqa: E731
        assert data()["ca.crt"] == first.read_text()
        (tmp_path / "two").mkdir()
        second, _ = self_signed(tmp_path / "two")
        ca.write_text(second.read_text())
        k8s.cp.wait_for(lambda: data()["ca.crt"] == second.read_text(), 30, "the new CA in the job's ConfigMap")
        assert "config.json" in data()
    finally:
        op.stop()


def test_a_deletion_the_watch_missed_is_forgotten_at_the_next_list(control_plane, namespace):
    """A 410 relist reports what exists, not what went: a deleted SFTJob (or pod) would stay in the
    cache forever, and be billed GPU-seconds. The lists run against the real API server here, on a
    cache that holds one SFTJob that exists, and an SFTJob and a pod whose DELETED events were missed."""
    from sft_operator.runtime.context import Context
    from sft_operator.runtime.loops import relist
    from sft_operator.runtime.client import KubeClient
    from sft_operator.runtime.watch import Watcher

    k8s = Cluster(control_plane, namespace)
    alive = k8s.create(manifest("alive", runPolicy={"suspend": True}))
    missed = {**manifest("missed"), "metadata": {"name": "missed", "namespace": namespace, "uid": str(uuid.uuid4())},
              "status": {"phase": "Running"}}
    stale_pod = {"metadata": {"name": "alive-0-x", "namespace": namespace, "uid": str(uuid.uuid4()),
                              "labels": {LABEL_JOB: "alive"}}, "status": {"phase": "Running"}}

    async def main():
        kube = KubeClient.from_kubeconfig(str(control_plane.kubeconfig))
        ctx = Context(OperatorSettings(namespaces=(namespace,)), kube, RenderOptions())
        ctx.kick = lambda key, delay=0.0: None
        try:
            ctx.cache.put("SFTJob", alive)
            ctx.cache.put("SFTJob", missed)
            ctx.cache.put("Pod", stale_pod)
            assert ctx.cache.phase_counts() == {"Pending": 1, "Running": 1}
            await asyncio.sleep(0.01)
            forgotten = await relist(ctx)
            await Watcher(ctx, "Pod", namespace).relist()  # what every (re)list of a children's watch does
            return forgotten, ctx.cache
        finally:
            await ctx.close()

    forgotten, cache = asyncio.run(main())
    assert forgotten == {(namespace, "missed")}
    assert set(cache.sftjobs) == {(namespace, "alive")} and not cache.pods
    assert cache.phase_counts() == {"Pending": 1}  # nothing Running is left to bill GPU-seconds for
