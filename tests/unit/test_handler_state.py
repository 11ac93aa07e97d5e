"""The operator's in-memory view: slim copies, pods of the current Job only, our writes overlaid."""

from __future__ import annotations

import kopf

from sft_operator.handlers.state import ClusterState, slim


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


def test_pods_of_ignores_pods_of_an_earlier_job_with_the_same_name():
    state = ClusterState()
    key = ("a", "demo")
    state.put_pod(key, {"metadata": {"uid": "p1", "ownerReferences": [{"uid": "old-job"}]}})
    state.put_pod(key, {"metadata": {"uid": "p2", "ownerReferences": [{"uid": "new-job"}]}})
    assert [p["metadata"]["uid"] for p in state.pods_of(key, "new-job")] == ["p2"]
    state.drop_pod(key, "p1")
    state.drop_pod(key, "p2")
    assert key not in state.pods


def test_current_status_overlays_our_last_write_for_the_same_uid_only():
    state = ClusterState()
    key = ("a", "demo")
    state.sftjobs[key] = {"metadata": {"uid": "u1"}, "status": {"phase": "Pending", "progress": {"percent": 3}}}
    state.written[key] = ("u1", {"phase": "Running"})
    assert state.current_status(key) == {"phase": "Running", "progress": {"percent": 3}}
    state.sftjobs[key] = {"metadata": {"uid": "u2"}, "status": {"phase": "Pending"}}  # recreated
    assert state.current_status(key) == {"phase": "Pending"}
    assert state.phase_counts() == {"Pending": 1}
    state.forget(key)
    assert key not in state.sftjobs and key not in state.written
