"""Reconcile decisions: whose a child is, suspension in both directions (and Kueue's say), stopping a
failed job, ConfigMap drift, API errors."""

from __future__ import annotations

from functools import partial

import pytest

from sft_operator.runtime.cache import slim
from sft_operator.core.decisions import (
    ANNOTATION_STOPPED_REASON,
    ANNOTATION_SUSPENDED_BY,
    FOREIGN,
    OURS as OWNED,
    PREVIOUS,
    api_error_cause,
    config_map_patch,
    conflict_cause,
    keep_claim_patch,
    ownership,
    prepare_job,
    stop_patch,
    suspend_patch,
    unexported_model,
)
from sft_operator.runtime.scheduler import backoff_delay

import builders

SFTJOB = {"apiVersion": "sft.dev/v1alpha1", "kind": "SFTJob", "metadata": {"name": "demo", "namespace": "a", "uid": "u-1"}}
OURS = {"apiVersion": "sft.dev/v1alpha1", "kind": "SFTJob", "name": "demo", "uid": "u-1", "controller": True,
        "blockOwnerDeletion": True}


job = partial(builders.job, annotations={})


def child(*refs: dict, labels: dict | None = None) -> dict:
    return {"kind": "Service", "metadata": {"name": "demo", "namespace": "a", "labels": labels or {},
                                            "ownerReferences": list(refs)}}


def test_only_a_child_this_sftjob_controls_is_ours():
    assert ownership(child(OURS), SFTJOB) == OWNED
    assert ownership(child({**OURS, "uid": "u-old"}), SFTJOB) == PREVIOUS  # a deleted SFTJob of the same name
    # Never adopted: a production Service, the orphan of an earlier SFTJob (our labels, no controller),
    # an object another controller owns.
    assert ownership(child(), SFTJOB) == FOREIGN
    assert ownership(child(labels={"sft.dev/job-name": "demo", "app.kubernetes.io/managed-by": "sft-operator"}),
                     SFTJOB) == FOREIGN
    assert ownership(child({**OURS, "controller": False}), SFTJOB) == FOREIGN
    assert ownership(child({"apiVersion": "apps/v1", "kind": "Deployment", "name": "demo", "uid": "d-1",
                            "controller": True}), SFTJOB) == FOREIGN


def test_a_foreign_object_is_a_final_name_conflict_naming_it():
    cause = conflict_cause("Service", child(), SFTJOB)
    assert cause.reason == "NameConflict" and cause.final
    assert "Service a/demo" in cause.message and "leaves it alone" in cause.message
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": "d-1", "controller": True}
    assert "controlled by Deployment web" in conflict_cause("Service", child(deployment), SFTJOB).message


def test_a_previous_sftjobs_child_is_waited_for():
    cause = conflict_cause("Job", child({**OURS, "uid": "u-old"}), SFTJOB)
    assert cause.reason == "AwaitingGarbageCollection" and not cause.final and "u-old" in cause.message


def test_config_map_drift_is_patched_back_including_a_removed_ca():
    rendered = {"data": {"config.json": "{}", "ca.crt": "NEW"}}
    cached = slim("ConfigMap", {"metadata": {"name": "demo-config"}, "data": {"config.json": "{}", "ca.crt": "OLD"}})
    assert config_map_patch(cached, rendered) == {"data": {"ca.crt": "NEW"}}
    current = slim("ConfigMap", {"metadata": {"name": "demo-config"}, "data": rendered["data"]})
    assert config_map_patch(current, rendered) is None
    without_ca = {"data": {"config.json": "{}"}}
    assert config_map_patch(cached, without_ca) == {"data": {"ca.crt": None}}


def test_a_running_jobs_config_is_kept_while_its_ca_is_brought_up_to_date():
    # An upgraded operator renders a config.json the old trainer image would reject: a started run keeps its own.
    started = slim("ConfigMap", {"metadata": {"name": "demo-config"},
                                 "data": {"config.json": '{"old": 1}', "ca.crt": "OLD"}})
    upgraded = {"data": {"config.json": '{"old": 1, "newField": true}', "ca.crt": "NEW"}}
    assert config_map_patch(started, upgraded, keep=("config.json",)) == {"data": {"ca.crt": "NEW"}}
    assert config_map_patch(started, {"data": {"config.json": '{"old": 1, "newField": true}', "ca.crt": "OLD"}},
                            keep=("config.json",)) is None
    assert config_map_patch(started, upgraded) == {"data": upgraded["data"]}  # before the Job exists: re-rendered


def test_the_job_of_a_failed_sftjob_is_stopped_once():
    patch = stop_patch(job(suspend=False), "ImagePullFailed")
    assert patch == {"metadata": {"annotations": {ANNOTATION_SUSPENDED_BY: "sft-operator",
                                                  ANNOTATION_STOPPED_REASON: "ImagePullFailed"}},
                     "spec": {"suspend": True}}
    assert stop_patch(job(suspend=True), "ImagePullFailed") is None
    finished = {**job(suspend=False), "status": {"conditions": [{"type": "Failed", "status": "True"}]}}
    assert stop_patch(finished, "BackoffLimitExceeded") is None
    assert stop_patch(None, "NameConflict") is None


MINE = {ANNOTATION_SUSPENDED_BY: "sft-operator"}
QUEUE = {"kueue.x-k8s.io/queue-name": "gpu"}


@pytest.mark.parametrize(
    "want,job_,expected",
    [
        (True, job(suspend=False), {"metadata": {"annotations": MINE}, "spec": {"suspend": True}}),
        (True, job(suspend=True, annotations=MINE), None),
        (True, job(suspend=True, labels=QUEUE), {"metadata": {"annotations": MINE}}),  # claim a queue-held Job
        (False, job(suspend=True, annotations=MINE), {"metadata": {"annotations": {ANNOTATION_SUSPENDED_BY: None}}, "spec": {"suspend": False}}),
        (False, job(suspend=True, annotations=MINE, labels=QUEUE), {"metadata": {"annotations": {ANNOTATION_SUSPENDED_BY: None}}, "spec": {"suspend": False}}),
        (False, job(suspend=True, labels=QUEUE), None),  # Kueue admits it, not us
        (False, job(suspend=True), {"metadata": {"annotations": {ANNOTATION_SUSPENDED_BY: None}}, "spec": {"suspend": False}}),
        (False, job(suspend=False), None),
        (False, job(suspend=False, annotations=MINE), {"metadata": {"annotations": {ANNOTATION_SUSPENDED_BY: None}}}),
    ],
)
def test_suspend_patch(want, job_, expected):
    assert suspend_patch(want, job_) == expected


def test_suspend_patch_touches_only_suspend_and_our_annotation():
    for want in (True, False):
        for j in (job(suspend=False), job(suspend=True), job(suspend=True, annotations=MINE, labels=QUEUE)):
            patch = suspend_patch(want, j) or {}
            assert set(patch) <= {"metadata", "spec"}
            assert set(patch.get("spec", {})) <= {"suspend"}
            assert set(patch.get("metadata", {}).get("annotations", {})) <= {ANNOTATION_SUSPENDED_BY}


def test_prepare_job_marks_a_suspended_job_as_ours():
    assert prepare_job(job(suspend=True))["metadata"]["annotations"] == MINE
    assert prepare_job(job(suspend=False))["metadata"]["annotations"] == {}


@pytest.mark.parametrize(
    "status,message,reason,final",
    [
        (403, 'jobs.batch "demo" is forbidden: exceeded quota: gpu, requested: requests.nvidia.com/gpu=16, used: 0, limited: 8',
         "QuotaExceeded", False),
        (403, 'jobs.batch is forbidden: User "system:serviceaccount:x:y" cannot create resource "jobs"', "Forbidden", False),
        (422, 'Job.batch "demo" is invalid: spec.template.spec.containers[0].resources.limits: Invalid value: "64Gii"',
         "InvalidSpec", True),
        (500, "etcdserver: request timed out", "CreateFailed", False),
    ],
)
def test_api_error_cause_keeps_the_api_message(status, message, reason, final):
    cause = api_error_cause(status, message, "Job", "demo")
    assert (cause.reason, cause.final) == (reason, final)
    assert message in cause.message and cause.message.startswith("creating Job demo")


def test_api_error_cause_without_a_message():
    assert "HTTP 503" in api_error_cause(503, "", "Job", "demo").message


def test_back_off_doubles_from_five_seconds_to_five_minutes():
    assert [backoff_delay(n) for n in range(1, 9)] == [5, 10, 20, 40, 80, 160, 300, 300]


# ---- what a cluster refuses before any pod starts ------------------------------------------------


def _spec(**spec):
    from sft_operator.api.types import SFTJob

    base = {"model": {"source": "pvc://datasets/base"}, "dataset": {"train": {"source": "pvc://datasets/train.jsonl"}},
            "output": {"destination": "pvc://models/run"}, **spec}
    return SFTJob.model_validate({"apiVersion": "sft.dev/v1alpha1", "kind": "SFTJob",
                                  "metadata": {"name": "demo", "namespace": "a"}, "spec": base})


def test_a_local_output_path_is_refused_with_the_way_out_and_cluster_destinations_are_not():
    from sft_operator.core.decisions import local_output_cause

    cause = local_output_cause(_spec(output={"destination": "/tmp/out"}).spec)
    assert cause.reason == "InvalidSpec" and cause.final
    assert cause.message.startswith("spec.output.destination: '/tmp/out' is a local path")
    assert "pvc://<claim>/<path> or s3://<bucket>/<prefix>" in cause.message
    assert local_output_cause(_spec().spec) is None
    assert local_output_cause(_spec(output={"destination": "s3://models/run"}).spec) is None


def pvc(name: str, *modes: str, bound: tuple[str, ...] = ()) -> dict:
    claim = {"metadata": {"name": name}, "spec": {"accessModes": list(modes)}}
    if bound:
        claim["status"] = {"phase": "Bound", "accessModes": list(bound)}
    return claim


def test_several_nodes_writing_a_read_write_once_claim_fail_early_saying_how_to_fix_it():
    from sft_operator.core.decisions import shared_claims_check

    job = _spec(resources={"nodes": 2})
    failure, warnings = shared_claims_check(job, {"models": pvc("models", "ReadWriteOnce"),
                                                  "datasets": pvc("datasets", "ReadWriteOnce")})
    assert failure.reason == "ReadWriteOnceClaim" and failure.final
    assert failure.message.startswith("spec.output.destination: PersistentVolumeClaim models is ReadWriteOnce")
    assert "use a ReadWriteMany claim, or write the output to s3://<bucket>/<prefix>" in failure.message
    (warning,) = warnings  # only read: Multi-Attach on most storage, warned about
    assert "datasets" in warning and "ReadWriteMany" in warning
    # a claim asking for ReadWriteOnce but bound to a ReadWriteMany volume can be shared
    assert shared_claims_check(job, {"models": pvc("models", "ReadWriteOnce", bound=("ReadWriteMany",))}) == (None, [])
    # one node: nothing to share; a claim that does not exist: the scheduler says so
    assert shared_claims_check(_spec(), {"models": pvc("models", "ReadWriteOnce")}) == (None, [])
    assert shared_claims_check(job, {}) == (None, [])


def test_a_named_read_write_once_cache_fails_early_too_and_an_operator_made_one_is_never_checked():
    from sft_operator.core.decisions import shared_claims_check

    named = _spec(resources={"nodes": 2}, model={"source": "s3://models/base"},
                  storage={"cache": {"claimName": "team-cache"}})
    failure, _ = shared_claims_check(named, {"team-cache": pvc("team-cache", "ReadWriteOncePod")})
    assert failure.message.startswith("spec.storage.cache.claimName: PersistentVolumeClaim team-cache is ReadWriteOncePod")
    assert "set spec.storage.cache.size instead" in failure.message
    ours = _spec(resources={"nodes": 2}, model={"source": "s3://models/base"})
    assert shared_claims_check(ours, {"demo-cache": pvc("demo-cache", "ReadWriteMany")}) == (None, [])


def test_a_failed_job_that_trained_through_keeps_its_cache_claim_when_deleted():
    spec = {"output": {"destination": "s3://models/demo"}}
    sftjob = {**SFTJOB, "spec": spec}
    trained = {"phase": "Failed", "progress": {"step": 300, "totalSteps": 300}}
    assert unexported_model(sftjob, trained) == "demo-cache"
    # Not when training did not finish, the job succeeded, the output is a claim, or the cache is the user's.
    assert unexported_model(sftjob, {**trained, "progress": {"step": 120, "totalSteps": 300}}) is None
    assert unexported_model(sftjob, {**trained, "phase": "Succeeded"}) is None
    assert unexported_model({**SFTJOB, "spec": {"output": {"destination": "pvc://models/demo"}}}, trained) is None
    named = {**SFTJOB, "spec": {**spec, "storage": {"cache": {"claimName": "team-cache"}}}}
    assert unexported_model(named, trained) is None

    claim = {"kind": "PersistentVolumeClaim", "metadata": {"name": "demo-cache", "ownerReferences": [OURS]}}
    # No ownerReference left: garbage collection keeps the claim when the SFTJob is deleted.
    assert keep_claim_patch(claim, SFTJOB) == {"metadata": {"ownerReferences": None,
                                                            "annotations": {"sft.dev/kept-for-export": "u-1"}}}
    released = {"kind": "PersistentVolumeClaim", "metadata": {"name": "demo-cache"}}
    assert keep_claim_patch(released, SFTJOB) is None  # once only; never someone else's claim
