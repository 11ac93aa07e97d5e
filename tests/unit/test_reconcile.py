"""Reconcile decisions: adoption, suspension in both directions (and Kueue's say), API errors."""

from __future__ import annotations

import json

import pytest

from sft_operator.reconcile import (
    ANNOTATION_SUSPENDED_BY,
    ChildConflict,
    adoption_patch,
    api_error_cause,
    prepare_job,
    retry_delay,
    suspend_patch,
)

SFTJOB = {"apiVersion": "sft.dev/v1alpha1", "kind": "SFTJob", "metadata": {"name": "demo", "namespace": "a", "uid": "u-1"}}
OURS = {"apiVersion": "sft.dev/v1alpha1", "kind": "SFTJob", "name": "demo", "uid": "u-1", "controller": True,
        "blockOwnerDeletion": True}


def job(suspend: bool, annotations: dict | None = None, labels: dict | None = None) -> dict:
    return {"kind": "Job", "metadata": {"name": "demo", "annotations": annotations or {}, "labels": labels or {}},
            "spec": {"suspend": suspend}}


def test_adoption_of_an_orphan_keeps_other_owners():
    other = {"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "u-9"}
    child = {"kind": "Job", "metadata": {"name": "demo", "ownerReferences": [other]}}
    assert adoption_patch(child, SFTJOB) == {"metadata": {"ownerReferences": [other, OURS]}}


def test_adoption_is_a_no_op_when_already_ours():
    assert adoption_patch({"kind": "Job", "metadata": {"name": "demo", "ownerReferences": [OURS]}}, SFTJOB) is None


def test_a_child_of_another_controller_is_a_conflict():
    theirs = {**OURS, "uid": "u-old"}
    with pytest.raises(ChildConflict, match="u-old"):
        adoption_patch({"kind": "Job", "metadata": {"name": "demo", "ownerReferences": [theirs]}}, SFTJOB)


MINE = {ANNOTATION_SUSPENDED_BY: "sft-operator"}
QUEUE = {"kueue.x-k8s.io/queue-name": "gpu"}


@pytest.mark.parametrize(
    "want,job_,expected",
    [
        (True, job(False), {"metadata": {"annotations": MINE}, "spec": {"suspend": True}}),
        (True, job(True, MINE), None),
        (True, job(True, labels=QUEUE), {"metadata": {"annotations": MINE}}),  # claim a queue-held Job
        (False, job(True, MINE), {"metadata": {"annotations": {ANNOTATION_SUSPENDED_BY: None}}, "spec": {"suspend": False}}),
        (False, job(True, MINE, QUEUE), {"metadata": {"annotations": {ANNOTATION_SUSPENDED_BY: None}}, "spec": {"suspend": False}}),
        (False, job(True, labels=QUEUE), None),  # Kueue admits it, not us
        (False, job(True), {"metadata": {"annotations": {ANNOTATION_SUSPENDED_BY: None}}, "spec": {"suspend": False}}),
        (False, job(False), None),
        (False, job(False, MINE), {"metadata": {"annotations": {ANNOTATION_SUSPENDED_BY: None}}}),
    ],
)
def test_suspend_patch(want, job_, expected):
    assert suspend_patch(want, job_) == expected


def test_suspend_patch_touches_only_suspend_and_our_annotation():
    for want in (True, False):
        for j in (job(False), job(True), job(True, MINE, QUEUE)):
            patch = suspend_patch(want, j) or {}
            assert set(patch) <= {"metadata", "spec"}
            assert set(patch.get("spec", {})) <= {"suspend"}
            assert set(patch.get("metadata", {}).get("annotations", {})) <= {ANNOTATION_SUSPENDED_BY}


def test_prepare_job_marks_a_suspended_job_as_ours():
    assert prepare_job(job(True))["metadata"]["annotations"] == MINE
    assert prepare_job(job(False))["metadata"]["annotations"] == {}


@pytest.mark.parametrize(
    "status,message,reason",
    [
        (403, 'jobs.batch "demo" is forbidden: exceeded quota: gpu, requested: requests.nvidia.com/gpu=16, used: 0, limited: 8', "QuotaExceeded"),
        (403, 'jobs.batch is forbidden: User "system:serviceaccount:x:y" cannot create resource "jobs"', "Forbidden"),
        (422, 'Job.batch "demo" is invalid: spec.template.spec.containers[0].image: Required value', "Invalid"),
        (500, "etcdserver: request timed out", "CreateFailed"),
    ],
)
def test_api_error_cause_keeps_the_api_message(status, message, reason):
    body = json.dumps({"kind": "Status", "status": "Failure", "message": message, "code": status})
    cause = api_error_cause(status, body, "Job", "demo")
    assert cause.reason == reason
    assert message in cause.message and cause.message.startswith("creating Job demo")


def test_api_error_cause_without_json_body():
    assert "HTTP 503" in api_error_cause(503, None, "Job", "demo").message
    assert "gateway down" in api_error_cause(502, b"gateway down", "Job", "demo").message


def test_retry_delay_backs_off_to_five_minutes():
    assert [retry_delay(r) for r in range(8)] == [5, 10, 20, 40, 80, 160, 300, 300]
