"""The cache the watches feed: slim copies, pods of the current Job only, our writes ahead of the
watch, and a sweep that forgets what a relist no longer shows."""

from __future__ import annotations

import collections
import time
from functools import partial

import kopf

from sft_operator.runtime.cache import Cache, slim

import builders


sftjob = partial(builders.sftjob, namespace="a", spec={})
pod = partial(builders.pod, namespace="a")


def test_slim_keeps_what_status_derivation_reads_and_drops_the_pod_template():
    job = kopf.Body({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "demo", "namespace": "a", "uid": "j1", "labels": {"x": "y"}, "managedFields": [{"big": 1}]},
        "spec": {"suspend": True, "completions": 1, "template": {"spec": {"containers": [{"name": "trainer"}]}}},
        "status": {"active": 1},
    })
    out = slim("Job", job)
    assert out["spec"] == {"suspend": True, "completions": 1}
    assert "managedFields" not in out["metadata"] and out["metadata"]["labels"] == {"x": "y"}
    assert out["status"] == {"active": 1}
    out["status"]["active"] = 2
    assert job["status"]["active"] == 1  # a copy, not a view


def test_slim_pods_keep_status_and_service_account_and_config_maps_only_a_digest():
    body = kopf.Body({
        "metadata": {"name": "p", "uid": "p1", "managedFields": [{"big": 1}], "ownerReferences": [{"uid": "j1"}]},
        "spec": {"containers": [{"name": "trainer", "env": [{"name": "X", "value": "y" * 1000}]}],
                 "serviceAccountName": "trainer"},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"},
                                                       {"type": "PodScheduled", "status": "True"}]},
    })
    out = slim("Pod", body)
    assert out["spec"] == {"serviceAccountName": "trainer"} and "managedFields" not in out["metadata"]
    assert [c["type"] for c in out["status"]["conditions"]] == ["PodScheduled"]  # what derivation reads
    out["metadata"]["ownerReferences"][0]["uid"] = "x"
    assert body["metadata"]["ownerReferences"][0]["uid"] == "j1"  # a deep copy
    fetching = slim("Pod", {"metadata": {"name": "p"}, "status": {"phase": "Pending", "initContainerStatuses": [
        {"name": "fetch", "state": {"running": {}}, "imageID": "sha256:x"}]}})
    assert fetching["status"]["initContainerStatuses"] == [{"name": "fetch", "state": {"running": {}}}]  # the fetch stage
    config = slim("ConfigMap", {"metadata": {"name": "c"}, "data": {"config.json": "{" + " " * 5000 + "}"}})
    assert set(config) == {"metadata", "dataDigests"} and len(config["dataDigests"]["config.json"]) == 32


def test_pods_of_ignores_pods_of_an_earlier_job_with_the_same_name():
    cache = Cache()
    cache.put("Pod", pod("demo-0-p1", uid="p1", job_uid="old-job"))
    cache.put("Pod", pod("demo-0-p2", uid="p2", job_uid="new-job"))
    assert [p["metadata"]["uid"] for p in cache.pods_of(("a", "demo"), "new-job")] == ["p2"]
    cache.drop("Pod", pod("demo-0-p1", uid="p1", job_uid="old-job"))
    cache.drop("Pod", pod("demo-0-p2", uid="p2", job_uid="new-job"))
    assert ("a", "demo") not in cache.pods


def test_our_write_is_the_status_until_the_watch_catches_up_for_the_same_uid_only():
    cache = Cache()
    key = ("a", "demo")
    cache.put("SFTJob", sftjob({"phase": "Pending"}, uid="u1", resourceVersion="10"))
    cache.record_write(key, {"metadata": {"uid": "u1", "resourceVersion": "12"}, "status": {"phase": "Running"}})
    assert cache.current_status(key) == {"phase": "Running"}
    cache.put("SFTJob", sftjob({"phase": "Pending"}, uid="u1", resourceVersion="11"))  # an older event arriving late
    assert cache.current_status(key) == {"phase": "Running"}
    cache.put("SFTJob", sftjob({"phase": "Running"}, uid="u1", resourceVersion="12"))  # the watch saw our write
    assert key not in cache.written
    cache.record_write(key, {"metadata": {"uid": "u1", "resourceVersion": "13"}, "status": {"phase": "Succeeded"}})
    cache.put("SFTJob", sftjob({"phase": "Pending"}, uid="u2", resourceVersion="14"))  # deleted and re-created
    assert cache.current_status(key) == {"phase": "Pending"}
    cache.forget(key)
    assert key not in cache.sftjobs and key not in cache.written


def test_phase_counts_are_kept_incrementally():
    cache = Cache()
    a, b = ("a", "one"), ("a", "two")
    cache.put("SFTJob", sftjob(uid="ua", name="one"))
    cache.put("SFTJob", sftjob({"phase": "Running"}, uid="ub", name="two"))
    assert cache.phase_counts() == {"Pending": 1, "Running": 1}
    cache.record_write(a, {"metadata": {"uid": "ua", "resourceVersion": "5"}, "status": {"phase": "Running"}})
    assert cache.phase_counts() == {"Running": 2}
    cache.record_write(b, {"metadata": {"uid": "ub", "resourceVersion": "6"}, "status": {"phase": "Succeeded"}})
    cache.forget(a)
    assert cache.phase_counts() == {"Succeeded": 1}
    assert cache.phase_counts() == dict(collections.Counter(
        cache.current_status(k).get("phase") or "Pending" for k in cache.sftjobs))


def test_sweep_forgets_what_a_relist_no_longer_shows_but_keeps_what_came_after_it():
    cache = Cache()
    cache.put("SFTJob", sftjob({"phase": "Running"}, uid="gone", name="deleted"))  # its DELETED event was missed
    cache.put("SFTJob", sftjob({"phase": "Running"}, uid="alive", name="kept"))
    cache.put("Pod", pod("kept-0-p-gone", uid="p-gone", job_uid="j", job="kept"))
    listed_at = time.monotonic()
    cache.put("SFTJob", sftjob(uid="new", name="newer"))  # created after the list began
    assert cache.sweep("SFTJob", {"a"}, {"alive"}, listed_at) == {("a", "deleted")}
    assert set(cache.sftjobs) == {("a", "kept"), ("a", "newer")}
    assert cache.phase_counts() == {"Running": 1, "Pending": 1}
    assert cache.sweep("SFTJob", {"other-namespace"}, set(), time.monotonic()) == set()  # out of scope
    assert cache.sweep("Pod", None, set(), time.monotonic()) == {("a", "kept")}
    assert ("a", "kept") not in cache.pods


def test_a_deleted_pod_that_failed_without_counting_stays_a_restart_after_it_is_gone():
    """`kubectl delete pod` mid-run: the pod fails with DisruptionTarget and the Job controller deletes it at
    once, maybe before any status write saw it. status.restarts must still count it."""
    from datetime import datetime, timezone

    from sft_operator.core.status import derive_status

    cache = Cache()
    key = cache.put("SFTJob", sftjob(uid="s1"))
    cache.put("Pod", pod("demo-0-p1", uid="p1", job_uid="j1"))
    disrupted = pod("demo-0-p1", uid="p1", job_uid="j1")
    disrupted["status"] = {"phase": "Failed", "conditions": [{"type": "DisruptionTarget", "status": "True"}]}
    cache.drop("Pod", disrupted)  # the DELETED event carries the pod's last state
    cache.put("Pod", pod("demo-0-p2", uid="p2", job_uid="j1"))  # the replacement runs
    cache.drop("Pod", {**pod("demo-0-p0", uid="p0", job_uid="j0"), "status": disrupted["status"]})  # a pod of an earlier Job: not ours

    job = {"metadata": {"name": "demo", "namespace": "a", "uid": "j1"}, "spec": {"completions": 1}, "status": {"active": 1}}
    status = derive_status(cache.sftjobs[key], job, cache.pods_of(key, "j1"), datetime.now(timezone.utc),
                           replaced_pods=cache.note(key).replaced_by("j1"))
    assert status["restarts"] == 1
    # Without the note (what the operator did before), the restart was lost once the pod was gone.
    assert derive_status(cache.sftjobs[key], job, cache.pods_of(key, "j1"), datetime.now(timezone.utc))["restarts"] == 0


def config_map(uid: str, name: str = "demo-config", controller: str = "demo") -> dict:
    return {"kind": "ConfigMap", "metadata": {
        "name": name, "namespace": "a", "uid": uid, "labels": {"sft.dev/job-name": "demo"},
        "ownerReferences": [{"apiVersion": "sft.dev/v1alpha1", "kind": "SFTJob", "name": controller, "uid": "s1",
                             "controller": True}]}}


def test_a_child_is_known_by_its_name_and_controller_not_by_the_label():
    cache = Cache()
    key = cache.put("SFTJob", sftjob(uid="s1"))
    assert cache.put("ConfigMap", config_map("c1")) == key
    assert cache.put("ConfigMap", config_map("x1", name="demo-notes")) is None  # someone's notes, our label
    notes = config_map("x2")
    notes["metadata"]["ownerReferences"] = []
    assert cache.put("ConfigMap", notes) is None  # our child's name but not ours: the create's 409 finds it
    assert cache.drop("ConfigMap", config_map("x1", name="demo-notes")) is None
    assert cache.child("ConfigMap", key)["metadata"]["uid"] == "c1"
    orphaned = config_map("c1")  # `kubectl delete --cascade=orphan` of an earlier SFTJob of this name
    orphaned["metadata"]["ownerReferences"] = []
    assert cache.put("ConfigMap", orphaned) is None and cache.child("ConfigMap", key) is None
    cache.put("ConfigMap", config_map("c1"))
    # a relist that no longer shows our ConfigMap forgets it (the watch missed its deletion)
    assert cache.sweep("ConfigMap", {"a"}, set(), time.monotonic()) == {key}
    assert cache.child("ConfigMap", key) is None


def test_a_lost_nodes_pod_force_deleted_while_running_counts_as_a_restart():
    """Node loss: the taint manager marks the pod DisruptionTarget, the pod garbage collector force-deletes it
    (the node marked out of service) and its last state still says Running. The Job replaces it uncounted;
    status.restarts and the Restarted Event must see it."""
    from datetime import datetime, timezone

    from sft_operator.core.status import derive_status

    cache = Cache()
    key = cache.put("SFTJob", sftjob(uid="s1"))
    lost = pod("demo-0-p1", uid="p1", job_uid="j1")
    lost["metadata"]["deletionTimestamp"] = "2026-12-07T10:00:00Z"
    lost["status"] = {"phase": "Running", "conditions": [{"type": "DisruptionTarget", "status": "True",
                                                          "reason": "DeletionByTaintManager"}]}
    cache.put("Pod", lost)
    cache.drop("Pod", lost)
    cache.put("Pod", pod("demo-0-p2", uid="p2", job_uid="j1"))
    finished = pod("demo-0-p3", uid="p3", job_uid="j1")  # a pod deleted after it succeeded is no restart
    finished["status"] = {"phase": "Succeeded", "conditions": [{"type": "DisruptionTarget", "status": "True"}]}
    cache.drop("Pod", finished)
    job = {"metadata": {"name": "demo", "namespace": "a", "uid": "j1"}, "spec": {"completions": 1}, "status": {"active": 1}}
    status = derive_status(cache.sftjobs[key], job, cache.pods_of(key, "j1"), datetime.now(timezone.utc),
                           replaced_pods=cache.note(key).replaced_by("j1"))
    assert status["restarts"] == 1
