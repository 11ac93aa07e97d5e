"""Reconciling one SFTJob against a fake API server: the children it creates, and what it leaves alone.
The real API server is in tests/integration."""

from __future__ import annotations

import asyncio
import copy
from functools import partial
from typing import Any

import pytest

from sft_operator.runtime.context import Context
from sft_operator.runtime.client import ApiError
from sft_operator.core.render import RenderOptions
from sft_operator.runtime.settings import OperatorSettings
from sft_operator.runtime.watch import child_event

import builders

from .fakes import FakeKube, Operator

KEY = ("team-a", "demo")


sftjob = partial(builders.sftjob, uid="sftjob-uid", resourceVersion="1", creationTimestamp="2026-12-07T10:00:00Z",
                 spec=builders.manifest()["spec"])


def running_pod(job_uid: str) -> dict[str, Any]:
    return builders.pod(job_uid=job_uid, state={"running": {"startedAt": "2026-12-07T10:00:05Z"}})


# A TensorBoard Service that copies the trainer pods' selector into its own labels, a notes ConfigMap, a scratch
# claim: someone else's objects that carry our label but are not our children.
FOREIGN = [
    ("Service", "demo-tensorboard", {"selector": {"sft.dev/job-name": "demo"}, "ports": [{"port": 6006}]}),
    ("ConfigMap", "demo-notes", None),
    ("PersistentVolumeClaim", "demo-scratch", {"accessModes": ["ReadWriteOnce"]}),
]


@pytest.mark.parametrize(("kind", "name", "spec"), FOREIGN, ids=[f[0] for f in FOREIGN])
def test_a_foreign_object_with_our_label_does_not_fail_a_running_job(kind, name, spec):
    kube = FakeKube()

    async def main() -> None:
        ctx = Context(OperatorSettings(status_window_seconds=0.05), kube, RenderOptions())
        try:
            ctx.cache.put("SFTJob", sftjob())
            await ctx.reconciler.manage(KEY)
            job = ctx.cache.job_of(KEY)
            assert job is not None
            child_event(ctx, "Pod", "ADDED", running_pod(job["metadata"]["uid"]))
            await asyncio.sleep(0.3)
            assert kube.writes[-1]["phase"] == "Running"

            foreign = {"apiVersion": "v1", "kind": kind, "metadata": {
                "name": name, "namespace": "team-a", "uid": "foreign-1", "resourceVersion": "7",
                "labels": {"sft.dev/job-name": "demo", "app": "tensorboard"}}}
            if spec is not None:
                foreign["spec"] = spec
            child_event(ctx, kind, "ADDED", foreign)
            await ctx.reconciler.manage(KEY)  # the periodic resync
            await asyncio.sleep(0.3)
            child_event(ctx, kind, "DELETED", foreign)
            await ctx.reconciler.manage(KEY)
            await asyncio.sleep(0.3)

            assert [w["phase"] for w in kube.writes] == ["Running"]  # never NameConflict, never Failed
            assert ctx.cache.note(KEY).creation_error is None
            assert not [p for p in kube.patches if p[0] == "Job"]  # its Job is not suspended
            ours = ctx.cache.child(kind, KEY)
            if ours is not None:  # the cache still holds our own child under the job
                assert ours["metadata"]["name"] != name
        finally:
            await ctx.scheduler.close()

    asyncio.run(main())


def test_a_taken_child_name_is_still_a_name_conflict():
    """Ignoring foreign objects in the cache must not hide a real conflict: the create's 409 finds it."""
    kube = FakeKube()

    async def main() -> None:
        ctx = Context(OperatorSettings(status_window_seconds=0.05), kube, RenderOptions())
        try:
            taken = {"apiVersion": "v1", "kind": "Service", "metadata": {
                "name": "demo", "namespace": "team-a", "labels": {"sft.dev/job-name": "demo"}}}
            child_event(ctx, "Service", "ADDED", await kube.create(taken))
            ctx.cache.put("SFTJob", sftjob())
            await ctx.reconciler.manage(KEY)
            await asyncio.sleep(0.3)
            cause = ctx.cache.note(KEY).creation_error
            assert cause is not None and cause.reason == "NameConflict" and "Service team-a/demo" in cause.message
            assert kube.writes[-1]["phase"] == "Failed"
            assert ("Job", "team-a", "demo") not in kube.objects  # no Job was created beside a taken name
        finally:
            await ctx.scheduler.close()

    asyncio.run(main())


def test_an_upgraded_operator_keeps_a_running_jobs_config_and_does_not_fail_a_spec_it_no_longer_accepts(monkeypatch):
    """The new operator renders a config.json that the running job's older trainer image would reject, and its
    stricter models refuse the running job's spec: the job keeps the config it started with and keeps running."""
    kube = FakeKube()

    async def main() -> None:
        old = Context(OperatorSettings(status_window_seconds=0.05), kube, RenderOptions())
        try:
            old.cache.put("SFTJob", sftjob())
            await old.reconciler.manage(KEY)
        finally:
            await old.scheduler.close()
        started_with = kube.objects[("ConfigMap", "team-a", "demo-config")]["data"]["config.json"]

        import sft_operator.core.render as render

        newer = render.trainer_config_json
        monkeypatch.setattr(render, "trainer_config_json", lambda job: newer(job)[:-1] + ', "newField": true}')
        upgraded = Context(OperatorSettings(status_window_seconds=0.05), kube, RenderOptions())
        try:
            upgraded.cache.put("SFTJob", sftjob())
            for (kind, _, _), obj in list(kube.objects.items()):  # the new operator lists the children
                child_event(upgraded, kind, "ADDED", copy.deepcopy(obj))
            job = upgraded.cache.job_of(KEY)
            child_event(upgraded, "Pod", "ADDED", running_pod(job["metadata"]["uid"]))
            await upgraded.reconciler.manage(KEY)
            assert not [p for p in kube.patches if p[0] == "ConfigMap" and "config.json" in p[2].get("data", {})]
            assert kube.objects[("ConfigMap", "team-a", "demo-config")]["data"]["config.json"] == started_with

            refused = sftjob()
            refused["metadata"]["generation"] = 2
            refused["spec"]["hyperparameters"] = {"learningRate": -1.0}  # what these models no longer accept
            upgraded.cache.put("SFTJob", refused)
            await upgraded.reconciler.manage(KEY)
            await asyncio.sleep(0.3)
            assert upgraded.cache.note(KEY).creation_error is None
            assert all(w["phase"] != "Failed" for w in kube.writes), kube.writes
        finally:
            await upgraded.scheduler.close()

    asyncio.run(main())


def test_a_failed_export_keeps_the_trained_model_when_the_sftjob_is_deleted():
    """Training finished, the export failed for good: the cache claim holding the model is released from the
    SFTJob (garbage collection would delete it with the SFTJob) and an Event says how to export or discard it."""
    kube = FakeKube()

    async def main() -> None:
        ctx = Context(OperatorSettings(status_window_seconds=0.05), kube, RenderOptions())
        try:
            failed = sftjob()
            failed["spec"]["output"] = {"destination": "s3://models/demo"}
            await kube.create({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {
                "name": "demo-cache", "namespace": "team-a", "ownerReferences": [{
                    "apiVersion": "sft.dev/v1alpha1", "kind": "SFTJob", "name": "demo", "uid": "sftjob-uid",
                    "controller": True, "blockOwnerDeletion": True}]}})
            failed["status"] = {"phase": "Failed", "progress": {"step": 300, "totalSteps": 300},
                                "conditions": [{"type": "Failed", "status": "True", "reason": "StorageUnavailable"}]}
            ctx.cache.put("SFTJob", failed)
            await ctx.reconciler.manage(KEY)
            await ctx.reconciler.manage(KEY)  # converged: once only
            await asyncio.sleep(0.1)
            released = [p for p in kube.patches if p[0] == "PersistentVolumeClaim"]
            assert released == [("PersistentVolumeClaim", "demo-cache", {"metadata": {
                "ownerReferences": None, "annotations": {"sft.dev/kept-for-export": "sftjob-uid"}}})]
            (event,) = [e for e in kube.events if e[1] == "ModelKept"]
            assert "storage.cache.claimName demo-cache" in event[2] and "kubectl delete pvc demo-cache" in event[2]
        finally:
            await ctx.scheduler.close()

    asyncio.run(main())


def test_a_config_map_watched_by_its_metadata_is_read_again_only_when_someone_else_changed_it():
    """The ConfigMap watch sends metadata only. Our own create's echo keeps the digests (no read); an edit by someone
    else is read once and the progress CA brought back, while the running job keeps the config.json it started with."""
    kube = FakeKube()
    options = RenderOptions(progress_base_url="https://op:8443", progress_ca_pem="-----CA-----")

    async def main() -> None:
        ctx = Context(OperatorSettings(status_window_seconds=0.05), kube, options)
        try:
            ctx.cache.put("SFTJob", sftjob())
            await ctx.reconciler.manage(KEY)
            child_event(ctx, "ConfigMap", "ADDED", kube.metadata_event("ConfigMap", "demo-config"))  # our create's echo
            await ctx.reconciler.manage(KEY)
            assert kube.gets == [] and kube.patches == []

            edited = kube.objects[("ConfigMap", "team-a", "demo-config")]
            started_with = edited["data"]["config.json"]
            edited["data"].update({"config.json": "{}", "ca.crt": "someone else's"})
            kube.bump(edited)
            child_event(ctx, "ConfigMap", "MODIFIED", kube.metadata_event("ConfigMap", "demo-config"))
            await ctx.reconciler.manage(KEY)
            await ctx.reconciler.manage(KEY)  # converged: read once, patched once
            assert kube.gets == [("ConfigMap", "demo-config")]
            assert [p[2] for p in kube.patches if p[0] == "ConfigMap"] == [{"data": {"ca.crt": "-----CA-----"}}]
            assert edited["data"] == {"config.json": "{}", "ca.crt": "-----CA-----"}  # the running job's config stays
            assert started_with != "{}"

            stale = kube.metadata_event("ConfigMap", "demo-config")
            stale["metadata"]["resourceVersion"] = "1"  # an event older than what the cache holds
            child_event(ctx, "ConfigMap", "MODIFIED", stale)
            await ctx.reconciler.manage(KEY)
            assert len(kube.gets) == 1
        finally:
            await ctx.scheduler.close()

    asyncio.run(main())


# ---- on the fakes of tests/unit/fakes.py: a fake API server, a fake clock, timers that wait for the test ----


def run_op(test, **settings: Any) -> Operator:
    return Operator(OperatorSettings(**settings)).run(test)


def edited(doc: dict[str, Any], **spec: Any) -> dict[str, Any]:
    """``doc`` after a spec edit: the next generation, as the API server stores it."""
    doc = copy.deepcopy(doc)
    doc["spec"].update(spec)
    meta = doc["metadata"]
    meta.update(generation=meta["generation"] + 1, resourceVersion=str(int(meta["resourceVersion"]) + 1))
    return doc


def children(kube: FakeKube) -> list[tuple[str, str]]:
    return sorted((kind, name) for kind, _, name in kube.objects)


def test_missing_children_are_created_once_and_a_deleted_one_again():
    async def test(op):
        op.cache.put("SFTJob", sftjob())
        await op.reconciler.manage(KEY)
        made = children(op.kube)
        assert made == [("ConfigMap", "demo-config"), ("Job", "demo"), ("PersistentVolumeClaim", "demo-cache"),
                        ("Service", "demo")]
        for ours in op.kube.objects.values():
            assert ours["metadata"]["ownerReferences"][0]["uid"] == "sftjob-uid"
        creates = len(op.kube.creates)
        await op.reconciler.manage(KEY)  # converged: the resync creates nothing
        assert len(op.kube.creates) == creates

        service = op.kube.objects.pop(("Service", "team-a", "demo"))  # someone deletes the Service
        op.cache.drop("Service", service)
        await op.reconciler.manage(KEY)
        assert children(op.kube) == made and op.kube.creates[creates:] == [("Service", "demo")]

    run_op(test)


def test_after_a_crash_the_children_it_created_are_found_by_their_409_and_none_is_made_twice():
    """A restart before the watches listed anything: every create answers 409; the objects are ours, so
    they are taken as they are and the job goes on (no NameConflict, no second Job)."""
    kube = FakeKube()

    async def main() -> None:
        first, after_crash = Operator(kube=kube), Operator(kube=kube)  # one API server, two operator lives
        try:
            first.cache.put("SFTJob", sftjob())
            await first.reconciler.manage(KEY)
            made = children(kube)
            after_crash.cache.put("SFTJob", sftjob())
            await after_crash.reconciler.manage(KEY)
            assert children(kube) == made
            assert after_crash.cache.note(KEY).creation_error is None
            assert after_crash.cache.job_of(KEY)["metadata"]["uid"] == kube.objects[("Job", "team-a", "demo")]["metadata"]["uid"]
            assert after_crash.scheduler.delay(KEY, "manage") is None  # nothing to retry
        finally:
            await first.close()
            await after_crash.close()

    asyncio.run(main())


def test_a_failed_create_says_why_and_is_retried_with_a_doubling_back_off_until_it_works():
    async def test(op):
        op.kube.fail("create", ApiError(500, "InternalError", "etcd leader changed"),
                     ApiError(500, "InternalError", "etcd leader changed"), kind="Job")
        op.cache.put("SFTJob", sftjob())
        await op.reconciler.manage(KEY)
        assert op.scheduler.delay(KEY, "manage") == 5.0
        await op.scheduler.advance(0)  # the status says why at once
        assert op.status(KEY)["reason"] == "CreateFailed" and "etcd leader changed" in str(op.status(KEY))
        assert ("Job", "team-a", "demo") not in op.kube.objects

        await op.scheduler.advance(4.9)
        assert [c for c in op.kube.creates if c[0] == "Job"] == [("Job", "demo")]  # not before the back-off
        await op.scheduler.advance(0.1)
        assert [c for c in op.kube.creates if c[0] == "Job"] == [("Job", "demo")] * 2
        assert op.scheduler.delay(KEY, "manage") == 10.0  # the second failure: twice as long

        await op.scheduler.advance(10)
        assert ("Job", "team-a", "demo") in op.kube.objects
        assert op.cache.note(KEY).creation_error is None and op.scheduler.delay(KEY, "manage") is None
        assert op.scheduler.failures == {}  # the next failure starts at 5 s again
        await op.scheduler.advance(120)
        assert op.status(KEY).get("reason") != "CreateFailed"

    run_op(test)


def test_a_child_the_api_server_calls_invalid_fails_the_job_with_its_message_and_is_never_retried():
    """(Was a 6-second sleep in tests/integration/test_operator_faults.py.) A 422 is final: no retry
    can make the object valid, so the Job is never created, however long one waits or resyncs."""
    message = 'spec.template.spec.containers[0].resources.limits[memory]: Invalid value: "64Gii"'

    async def test(op):
        op.kube.fail("create", ApiError(422, "Invalid", message), kind="Job")
        op.cache.put("SFTJob", sftjob())
        await op.reconciler.manage(KEY)
        await op.scheduler.advance(0)
        status = op.status(KEY)
        failed = [c for c in status["conditions"] if c["type"] == "Failed"][0]
        assert status["phase"] == "Failed" and failed["reason"] == "InvalidSpec" and "64Gii" in failed["message"]
        assert op.scheduler.delay(KEY, "manage") is None  # no retry scheduled

        await op.scheduler.advance(600)  # far past every back-off
        await op.reconciler.manage(KEY)  # and the periodic resync
        assert ("Job", "team-a", "demo") not in op.kube.objects
        assert [c for c in op.kube.creates if c[0] == "Job"] == [("Job", "demo")]  # the one refused try
        assert op.status(KEY)["phase"] == "Failed"

    run_op(test)


def test_stopping_the_job_of_a_failed_sftjob_is_retried_with_back_off_until_it_works():
    """(Was a 3-second sleep in tests/integration/test_operator_faults.py.) A refused suspend leaves the
    Job running and is tried again after 5 s, then 10 s, until the API server takes it."""
    async def test(op):
        doc = sftjob()
        op.cache.put("SFTJob", doc)
        await op.reconciler.manage(KEY)
        failed = copy.deepcopy(doc)
        failed["metadata"]["resourceVersion"] = "2"
        failed["status"] = {"phase": "Failed", "conditions": [{"type": "Failed", "status": "True", "reason": "ImagePullFailed",
                                                               "message": "image cannot be pulled"}]}
        op.cache.put("SFTJob", failed)
        refused = ApiError(403, "Forbidden", "suspending Jobs is paused here")
        op.kube.fail("patch", refused, refused, kind="Job")

        def suspended() -> bool:
            return bool(op.kube.objects[("Job", "team-a", "demo")]["spec"].get("suspend"))

        await op.reconciler.manage(KEY)
        assert not suspended() and op.scheduler.delay(KEY, "manage") == 5.0
        await op.scheduler.advance(5)
        assert not suspended() and op.scheduler.delay(KEY, "manage") == 10.0
        await op.scheduler.advance(10)
        assert suspended()
        annotations = op.kube.objects[("Job", "team-a", "demo")]["metadata"]["annotations"]
        assert "ImagePullFailed" in annotations.values()
        assert op.scheduler.delay(KEY, "manage") is None
        patches = len(op.kube.patches)
        await op.reconciler.manage(KEY)  # converged: stopped once
        assert len(op.kube.patches) == patches

    run_op(test)


def test_suspend_and_resume_patch_only_the_jobs_suspension():
    async def test(op):
        doc = edited(sftjob(), runPolicy={"suspend": True})
        op.cache.put("SFTJob", doc)
        await op.reconciler.manage(KEY)
        job = op.kube.objects[("Job", "team-a", "demo")]
        assert job["spec"]["suspend"] is True  # created suspended: no pod ever starts

        doc = edited(doc, runPolicy={"suspend": False})
        op.cache.put("SFTJob", doc)
        await op.reconciler.manage(KEY)
        assert job["spec"]["suspend"] is False
        doc = edited(doc, runPolicy={"suspend": True})
        op.cache.put("SFTJob", doc)
        await op.reconciler.manage(KEY)
        assert job["spec"]["suspend"] is True
        assert [(kind, patch["spec"]) for kind, _, patch in op.kube.patches] == [
            ("Job", {"suspend": False}), ("Job", {"suspend": True})]  # nothing but spec.suspend
        assert [c[0] for c in op.kube.creates].count("Job") == 1

    run_op(test)


def test_a_name_taken_by_an_object_we_did_not_create_fails_the_job_and_is_never_retried():
    async def test(op):
        await op.kube.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "demo", "namespace": "team-a"}})
        op.cache.put("SFTJob", sftjob())
        await op.reconciler.manage(KEY)
        await op.scheduler.advance(0)
        assert op.status(KEY)["phase"] == "Failed" and op.status(KEY)["reason"] == "NameConflict"
        assert op.scheduler.delay(KEY, "manage") is None
        assert "ownerReferences" not in op.kube.objects[("Service", "team-a", "demo")]["metadata"]  # left alone
        assert ("Job", "team-a", "demo") not in op.kube.objects

    run_op(test)
