"""Reconciling one SFTJob against a fake API server: the children it creates, and what it leaves alone.
The real API server is in tests/integration."""

from __future__ import annotations

import asyncio
import copy
import itertools
from typing import Any

import pytest

from sft_operator.runtime.context import Context
from sft_operator.runtime.client import ApiError
from sft_operator.core.render import RenderOptions
from sft_operator.runtime.settings import OperatorSettings
from sft_operator.runtime.watch import child_event

from .helpers import manifest

KEY = ("team-a", "demo")


class FakeKube:
    """Creates, reads and patches objects in memory like the API server (uids, 409 on a taken name)."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.patches: list[tuple[str, str, dict[str, Any]]] = []
        self.writes: list[dict[str, Any]] = []
        self.events: list[tuple[str, str, str]] = []
        self.gets: list[tuple[str, str]] = []
        self.uids = itertools.count(1)

    async def create(self, obj: dict[str, Any], **_: Any) -> dict[str, Any]:
        meta = obj["metadata"]
        where = (obj["kind"], meta.get("namespace", "team-a"), meta["name"])
        if where in self.objects:
            raise ApiError(409, "AlreadyExists", f"{obj['kind']} {meta['name']} already exists")
        made = copy.deepcopy(obj)
        made["metadata"].update(namespace=where[1], uid=f"{obj['kind'].lower()}-{next(self.uids)}", resourceVersion="1",
                                creationTimestamp="2026-12-07T10:00:00Z")
        self.objects[where] = made
        return copy.deepcopy(made)

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        self.gets.append((kind, name))
        if (kind, namespace, name) not in self.objects:
            raise ApiError(404, "NotFound", f"{kind} {name} not found")
        return copy.deepcopy(self.objects[(kind, namespace, name)])

    async def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.patches.append((kind, name, patch))
        obj = self.objects[(kind, namespace, name)]
        obj.setdefault("spec", {}).update(patch.get("spec") or {})
        for k, v in (patch.get("data") or {}).items():  # a merge patch: null removes the key
            if v is None:
                obj["data"].pop(k, None)
            else:
                obj["data"][k] = v
        self.bump(obj)
        return copy.deepcopy(obj)

    def bump(self, obj: dict[str, Any]) -> None:
        obj["metadata"]["resourceVersion"] = str(int(obj["metadata"]["resourceVersion"]) + 1)

    def metadata_event(self, kind: str, name: str) -> dict[str, Any]:
        """What a watch by metadata (PartialObjectMetadata) shows of an object."""
        obj = self.objects[(kind, "team-a", name)]
        return {"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": copy.deepcopy(obj["metadata"])}

    async def replace_status(self, namespace: str, name: str, uid: str, status: dict[str, Any]) -> dict[str, Any]:
        self.writes.append(status)
        return {"metadata": {"uid": uid, "resourceVersion": str(100 + len(self.writes))}, "status": status}

    async def post_event(self, involved: dict[str, Any], kind: str, reason: str, message: str) -> None:
        self.events.append((kind, reason, message))

    async def events_of(self, namespace: str, kind: str, name: str, uid: str) -> list[dict[str, Any]]:
        return []

    def stalled_seconds(self) -> float:
        return 0.0

    async def close(self) -> None:
        pass


def sftjob() -> dict[str, Any]:
    doc = manifest()
    doc["metadata"].update(uid="sftjob-uid", generation=1, resourceVersion="1", creationTimestamp="2026-12-07T10:00:00Z")
    return doc


def running_pod(job_uid: str) -> dict[str, Any]:
    return {"kind": "Pod",
            "metadata": {"name": "demo-0-abcde", "namespace": "team-a", "uid": "pod-1",
                         "labels": {"sft.dev/job-name": "demo", "batch.kubernetes.io/job-completion-index": "0"},
                         "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "demo", "uid": job_uid,
                                              "controller": True}]},
            "status": {"phase": "Running", "conditions": [{"type": "PodScheduled", "status": "True"}],
                       "containerStatuses": [{"name": "trainer", "state": {"running": {"startedAt": "2026-12-07T10:00:05Z"}}}]}}


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
