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


def test_slim_trims_before_copying_and_keeps_pod_status():
    pod = kopf.Body({
        "metadata": {"name": "p", "uid": "p1", "managedFields": [{"big": 1}], "ownerReferences": [{"uid": "j1"}]},
        "spec": {"containers": [{"name": "trainer"}]},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
    })
    out = slim("Pod", pod)
    assert set(out) == {"metadata", "status"} and "managedFields" not in out["metadata"]
    out["metadata"]["ownerReferences"][0]["uid"] = "x"
    out["status"]["conditions"][0]["status"] = "False"
    assert pod["metadata"]["ownerReferences"][0]["uid"] == "j1"  # a deep copy
    assert pod["status"]["conditions"][0]["status"] == "True"
    assert slim("Job", {"status": {}}) == {"metadata": {}, "spec": {}, "status": {}}


def test_phase_counts_are_kept_incrementally():
    state = ClusterState()
    a, b = ("ns", "a"), ("ns", "b")
    state.sftjobs[a] = {"metadata": {"uid": "ua"}, "status": {}}
    state.track_phase(a)
    state.sftjobs[b] = {"metadata": {"uid": "ub"}, "status": {"phase": "Running"}}
    state.track_phase(b)
    assert state.phase_counts() == {"Pending": 1, "Running": 1}
    state.written[a] = ("ua", {"phase": "Running"})
    state.track_phase(a)
    assert state.phase_counts() == {"Running": 2}
    state.written[b] = ("ub", {"phase": "Succeeded"})
    state.track_phase(b)
    state.forget(a)
    assert state.phase_counts() == {"Succeeded": 1}
    assert state.phase_counts() == dict(__import__("collections").Counter(
        state.current_status(k).get("phase") or "Pending" for k in state.sftjobs))


def test_call_gate_serves_status_patches_before_waiting_creates():
    import asyncio
    import threading

    from sft_operator.handlers.kube import CREATE, STATUS, CallGate

    order: list[str] = []
    release = threading.Event()

    def call(name: str) -> str:
        if name == "first":
            release.wait(5)
        order.append(name)
        return name

    async def main() -> list[str]:
        gate = CallGate(slots=1)
        first = asyncio.ensure_future(gate.run(CREATE, call, "first"))
        await asyncio.sleep(0.01)
        creates = [asyncio.ensure_future(gate.run(CREATE, call, f"create{i}")) for i in range(2)]
        cancelled = asyncio.ensure_future(gate.run(STATUS, call, "cancelled"))
        status = asyncio.ensure_future(gate.run(STATUS, call, "status"))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        release.set()
        results = await asyncio.gather(first, *creates, status)
        assert gate.free == 1
        return results

    assert asyncio.run(main()) == ["first", "create0", "create1", "status"]
    assert order == ["first", "status", "create0", "create1"]
