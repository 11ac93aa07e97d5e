"""The one status writer: coalescing, the progress rate limit for every report, refusals once a job
is finished or re-created, and the durable result. The Kubernetes client is a recording fake; the
real API server is in tests/integration."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

import pytest

from sft_contract.messages import ProgressReport
from sft_operator.core.render import RenderOptions
from sft_operator.runtime import writer
from sft_operator.runtime.client import ApiError
from sft_operator.runtime.context import Context
from sft_operator.runtime.settings import OperatorSettings
from sft_operator.runtime.writer import ProgressRefused

import builders

from .fakes import Operator

KEY = ("team-a", "demo")


class RecordingKube:
    """Answers status writes like the API server (the object back, a new resourceVersion)."""

    def __init__(self) -> None:
        self.writes: list[tuple[float, dict[str, Any]]] = []
        self.events: list[tuple[str, str]] = []
        self.event_reads: list[tuple[str, str]] = []
        self.version = 100

    async def replace_status(self, namespace: str, name: str, uid: str, status: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        self.writes.append((asyncio.get_running_loop().time(), status))
        return {"metadata": {"uid": uid, "resourceVersion": str(self.version)}, "status": status}

    async def post_event(self, involved: dict[str, Any], kind: str, reason: str, message: str) -> None:
        self.events.append((kind, reason))

    async def events_of(self, namespace: str, kind: str, name: str, uid: str) -> list[dict[str, Any]]:
        self.event_reads.append((kind, name))
        return []

    def stalled_seconds(self) -> float:
        return 0.0

    async def close(self) -> None:
        pass


# The builders (tests/builders.py) with this file's objects: SFTJob u-1 owns Job j-1, which owns the pod.
sftjob = partial(builders.sftjob, resourceVersion="1", creationTimestamp="2020-01-01T00:00:00Z",
                 spec=builders.manifest()["spec"])
job = partial(builders.job, uid="j-1", owner_uid="u-1", created="2020-01-01T00:00:01Z")
pod = partial(builders.pod, "demo-0-x", uid="p-1", job_uid="j-1")


def report(step: int, **extra: Any) -> ProgressReport:
    return ProgressReport.model_validate({"step": step, "totalSteps": 100, "epoch": step / 50, "trainLoss": 1.0, **extra})


def run(test, kube: RecordingKube | None = None, **settings: Any) -> RecordingKube:
    kube = kube or RecordingKube()

    async def main() -> None:
        ctx = Context(OperatorSettings(**{"status_window_seconds": 0.05, **settings}), kube, RenderOptions())
        ctx.kick = lambda key, delay=0.0: None  # no reconciling here: the cache is set up by hand
        ctx.cache.put("SFTJob", sftjob())
        try:
            await test(ctx)
        finally:
            await ctx.scheduler.close()

    asyncio.run(main())
    return kube


def test_changes_within_the_window_become_one_write():
    async def test(ctx):
        ctx.cache.put("Job", job(active=1))
        ctx.writer.mark(KEY)
        ctx.cache.put("Pod", pod())
        ctx.writer.mark(KEY)
        await asyncio.sleep(0.3)
        assert [w[1]["phase"] for w in ctx.kube.writes] == ["Running"]
        ctx.writer.mark(KEY)  # nothing new: no write
        await asyncio.sleep(0.2)
        assert len(ctx.kube.writes) == 1

    run(test)


def test_every_report_is_rate_limited_final_ones_too():
    async def test(ctx):
        ctx.cache.put("Job", job(active=1))
        ctx.cache.put("Pod", pod())
        for step in range(1, 60):  # 172 reports a second in the review; here as fast as the loop goes
            final = {"outputModel": "pvc://m/out"} if step % 2 else {}
            ctx.writer.offer("team-a", "demo", "u-1", report(step, **final))
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.7)
        times = [t for t, w in ctx.kube.writes if "progress" in w]
        assert len(times) <= 3, times  # ~0.9 s of reports at one write per 0.4 s
        assert all(b - a >= 0.39 for a, b in zip(times, times[1:]))
        assert ctx.kube.writes[-1][1]["progress"]["step"] == 59  # the newest report always lands

    run(test, progress_min_interval_seconds=0.4)


def test_reports_are_refused_once_the_job_finished_or_was_recreated():
    async def test(ctx):
        with pytest.raises(ProgressRefused) as refused:
            ctx.writer.offer("team-a", "demo", "u-old", report(1))
        assert (refused.value.status, refused.value.reason) == (409, "Recreated")
        with pytest.raises(ProgressRefused) as refused:
            ctx.writer.offer("team-a", "other", "u-1", report(1))
        assert refused.value.status == 404
        ctx.cache.put("Job", job(conditions=[{"type": "Complete", "status": "True"}], completionTime="2020-01-01T00:01:00Z"))
        ctx.writer.mark(KEY)
        await asyncio.sleep(0.2)
        assert ctx.kube.writes[-1][1]["phase"] == "Succeeded"
        with pytest.raises(ProgressRefused) as refused:
            ctx.writer.offer("team-a", "demo", "u-1", report(100))
        assert (refused.value.status, refused.value.reason) == (409, "Finished")

    run(test)


def complete_with(ctx, message: str) -> None:
    """A complete Job whose pod ended with ``message`` as its termination message."""
    ctx.cache.put("Job", job(conditions=[{"type": "Complete", "status": "True"}], completionTime="2020-01-01T00:01:00Z"))
    ctx.cache.put("Pod", pod(phase="Succeeded", state={"terminated": {"exitCode": 0, "reason": "Completed", "message": message,
                                                         "finishedAt": "2020-01-01T00:00:59Z"}}))


def test_the_result_in_the_termination_message_becomes_status_output():
    message = '{"outputModel":"pvc://models/demo/model","steps":100,"totalSteps":100,"epochs":2.0,"trainLoss":0.5}'

    async def test(ctx):
        complete_with(ctx, message)
        ctx.writer.mark(KEY)
        await asyncio.sleep(0.2)
        (_, written), = ctx.kube.writes
        assert written["phase"] == "Succeeded"
        assert written["output"] == {"model": "pvc://models/demo/model"}
        assert written["progress"]["percent"] == 100 and written["metrics"]["trainLoss"] == 0.5

    run(test)


def test_a_first_pods_starting_state_is_held_back_then_written(monkeypatch):
    monkeypatch.setattr(writer, "STARTING_HOLD_SECONDS", 2.0)

    async def test(ctx):
        fresh = job(active=1)
        fresh["metadata"]["creationTimestamp"] = ctx_now()
        ctx.cache.put("Job", fresh)
        starting = pod(phase="Pending", state={"waiting": {"reason": "ContainerCreating"}})
        starting["metadata"]["creationTimestamp"] = ctx_now()
        ctx.cache.put("Pod", starting)
        ctx.writer.mark(KEY)
        await asyncio.sleep(0.3)
        assert ctx.kube.writes == []  # the pods usually run within seconds: no "Pending" write yet
        await asyncio.sleep(2.7)  # (creationTimestamp has whole seconds: the hold ends 1-2 s from now)
        assert [w[1]["reason"] for w in ctx.kube.writes] == ["PodsStarting"]

    run(test)


def test_a_failure_posts_one_warning_event_and_a_success_none():
    async def test(ctx):
        ctx.cache.put("Job", job(conditions=[{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]))
        ctx.writer.mark(KEY)
        await asyncio.sleep(0.2)
        assert ctx.kube.events == [("Warning", "Failed")]

    run(test)


def ctx_now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_a_training_report_ends_the_fetching_stage_when_reports_are_coalesced():
    from sft_operator.runtime.writer import merge_reports

    fetching = ProgressReport.model_validate({"step": 0, "totalSteps": 0, "epoch": 0.0, "stage": "fetching",
                                              "bytesDone": 10, "bytesTotal": 10})
    merged = merge_reports(fetching, report(3))
    assert (merged.stage, merged.bytes_done, merged.bytes_total, merged.step) == (None, None, None, 3)


def test_a_result_with_a_warning_posts_a_warning_event_once():
    message = ('{"outputModel":"s3://b/run/model","outputUri":"s3://b/run","steps":100,"totalSteps":100,'
               '"warning":"MLflow at http://m:5000: could not start the run"}')

    async def test(ctx):
        complete_with(ctx, message)
        ctx.writer.mark(KEY)
        await asyncio.sleep(0.2)
        ctx.writer.mark(KEY)  # a later write of the same final state posts nothing more
        await asyncio.sleep(0.2)
        assert ctx.kube.events == [("Warning", "CompletedWithWarning")]
        assert ctx.kube.writes[-1][1]["output"]["uri"] == "s3://b/run"

    run(test)


@pytest.mark.parametrize("pods_appear", [False, True])
def test_events_are_read_for_a_job_still_without_pods_and_not_once_its_pods_came(pods_appear):
    """A Job without pods for 10 s has its events read (FailedCreate says why); in a burst nearly
    every Job waits a moment for its pods, and a read planned then is dropped once they came."""
    from datetime import datetime, timedelta, timezone

    async def test(ctx):
        now = datetime.now(timezone.utc)
        await asyncio.sleep(1.05 - now.microsecond / 1e6)  # just past a whole second: the read is due in ~0.9 s
        waiting = job(active=0)
        created = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(seconds=9)
        waiting["metadata"]["creationTimestamp"] = created.strftime("%Y-%m-%dT%H:%M:%SZ")
        ctx.cache.put("Job", waiting)
        ctx.writer.mark(KEY)
        await asyncio.sleep(0.2)  # written (or held); the events read is planned for 10 s after the Job's creation
        if pods_appear:
            ctx.cache.put("Pod", pod())
        await asyncio.sleep(1.6)
        assert ctx.kube.event_reads == ([] if pods_appear else [("Job", "demo")])

    run(test)


# ---- issue 19 defect 3: start problems timed from when they began, with the default grace ----


def ago(seconds: float) -> str:
    from datetime import datetime, timedelta, timezone

    return (datetime.now(timezone.utc) - timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def starting_pod(scheduled_seconds_ago: float, state: dict[str, Any]) -> dict[str, Any]:
    p = pod(phase="Pending", state=state)
    p["metadata"]["creationTimestamp"] = ago(scheduled_seconds_ago + 1)
    p["status"]["conditions"] = [{"type": "PodScheduled", "status": "True", "lastTransitionTime": ago(scheduled_seconds_ago)}]
    p["status"]["containerStatuses"][0]["image"] = "ghcr.io/sft-operator/trainer:0.1.0"
    return p


def test_a_slow_pull_with_one_transient_error_does_not_fail_the_job():
    """Our 6.6 GB image pulled for 5 minutes, then one ErrImagePull: the job waits for the retry, then runs."""
    async def test(ctx):
        ctx.cache.put("Job", job(active=1))
        ctx.cache.put("Pod", starting_pod(300, {"waiting": {"reason": "ErrImagePull", "message": "i/o timeout"}}))
        ctx.writer.mark(KEY)
        await asyncio.sleep(0.3)
        ctx.cache.put("Pod", starting_pod(310, {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off"}}))
        ctx.writer.mark(KEY)
        await asyncio.sleep(0.3)
        ctx.cache.put("Pod", pod())  # the retried pull finished
        ctx.writer.mark(KEY)
        await asyncio.sleep(0.3)
        assert [(w["phase"], w["reason"]) for _, w in ctx.kube.writes] == [
            ("Pending", "ErrImagePull"), ("Pending", "ImagePullBackOff"), ("Running", "PodsRunning")]
        assert ctx.kube.events == []

    run(test)


def test_a_pull_that_keeps_failing_fails_after_the_grace_naming_the_image():
    async def test(ctx):
        ctx.cache.put("Job", job(active=1))
        ctx.cache.put("Pod", starting_pod(5, {"waiting": {"reason": "ImagePullBackOff",
                                                          "message": 'Back-off pulling image "ghcr.io/sft-operator/trainer:0.1.0"'}}))
        ctx.writer.mark(KEY)
        await asyncio.sleep(0.3)
        assert ctx.kube.writes[-1][1]["phase"] == "Pending"
        await asyncio.sleep(1.5)  # the writer derives again when the grace ends
        failed = ctx.kube.writes[-1][1]
        (cond,) = [c for c in failed["conditions"] if c["type"] == "Failed"]
        assert (failed["phase"], cond["reason"]) == ("Failed", "ImagePullFailed")
        assert cond["message"].startswith("image ghcr.io/sft-operator/trainer:0.1.0: Back-off pulling image")
        assert ctx.kube.events == [("Warning", "Failed")]

    run(test, pod_start_grace_seconds=1)


class MultiAttachKube(RecordingKube):
    """The replacement pod's events after a node loss: Multi-Attach since its first attempt, 6 minutes ago."""

    async def events_of(self, namespace: str, kind: str, name: str, uid: str) -> list[dict[str, Any]]:
        self.event_reads.append((kind, name))
        return [{"type": "Warning", "reason": "FailedAttachVolume", "count": 24, "firstTimestamp": ago(360),
                 "lastTimestamp": ago(5), "message": 'Multi-Attach error for volume "pvc-1" Volume is already '
                                                     "exclusively attached to one node and can't be attached to another"}]


def test_multi_attach_until_the_force_detach_keeps_the_job_pending_not_failed():
    async def test(ctx):
        ctx.cache.put("Job", job(active=1))
        ctx.cache.put("Pod", starting_pod(365, {"waiting": {"reason": "ContainerCreating"}}))
        ctx.writer.mark(KEY)
        await asyncio.sleep(0.5)  # the pod's events are read (it has been scheduled > 10 s), then derived again
        assert ctx.kube.event_reads == [("Pod", "demo-0-x")]
        assert [(w["phase"], w["reason"]) for _, w in ctx.kube.writes][-1] == ("Pending", "MultiAttach")
        assert "Failed" not in [w["phase"] for _, w in ctx.kube.writes]

    run(test, MultiAttachKube())


# ---- issue 19 defect 5: a result whose pod update comes after the Job's Complete is still written ----

RESULT = ('{"outputModel":"s3://b/run/model","outputUri":"s3://b/run","mlflowRunId":"abc123","steps":100,'
          '"totalSteps":100,"warning":"MLflow at http://m:5000: run not closed"}')


def succeeded_pod(message: str = RESULT) -> dict[str, Any]:
    return pod(phase="Succeeded", state={"terminated": {"exitCode": 0, "reason": "Completed", "message": message,
                                            "finishedAt": ago(2)}})


def complete_job() -> dict[str, Any]:
    return job(conditions=[{"type": "Complete", "status": "True", "lastTransitionTime": ago(1)}],
               completionTime=ago(1), succeeded=1)


def test_a_result_whose_pod_update_comes_after_the_jobs_complete_is_in_the_succeeded_write():
    async def test(ctx):
        ctx.cache.put("Job", job(active=1))
        ctx.cache.put("Pod", pod())
        ctx.writer.mark(KEY)
        await asyncio.sleep(0.3)
        ctx.cache.put("Job", complete_job())  # the Job's watch is ahead of the pods' watch
        ctx.writer.mark(KEY)
        await asyncio.sleep(0.3)
        ctx.cache.put("Pod", succeeded_pod())
        ctx.writer.mark(KEY)
        await asyncio.sleep(0.3)
        assert [w["phase"] for _, w in ctx.kube.writes] == ["Running", "Succeeded"]
        output = ctx.kube.writes[-1][1]["output"]
        assert (output["uri"], output["mlflowRunId"]) == ("s3://b/run", "abc123")
        assert ctx.kube.events == [("Warning", "CompletedWithWarning")]

    run(test)


def test_a_succeeded_status_without_its_result_is_completed_once_the_pod_shows_it():
    """An operator restarted after writing Succeeded without the result (its pod had not been seen): the
    status is completed from the pod as soon as the pod watch lists it."""
    async def test(ctx):
        written = {"phase": "Succeeded", "reason": "Completed", "observedGeneration": 1, "restarts": 0,
                   "jobName": "demo", "startTime": "2020-01-01T00:00:03Z", "completionTime": "2020-01-01T00:01:00Z",
                   "conditions": [{"type": "Succeeded", "status": "True", "reason": "Completed",
                                   "message": "training finished", "observedGeneration": 1,
                                   "lastTransitionTime": "2020-01-01T00:01:00Z"}]}
        ctx.cache.put("SFTJob", {**sftjob(), "status": written})
        ctx.cache.put("Job", complete_job())
        ctx.writer.mark(KEY)  # the resync
        await asyncio.sleep(0.3)
        assert ctx.kube.writes == []  # nothing new yet
        ctx.cache.put("Pod", succeeded_pod())
        ctx.writer.mark(KEY)
        await asyncio.sleep(0.3)
        (_, completed), = ctx.kube.writes
        assert completed["phase"] == "Succeeded" and completed["output"]["uri"] == "s3://b/run"
        assert completed["output"]["mlflowRunId"] == "abc123" and completed["progress"]["percent"] == 100
        assert ctx.kube.events == [("Warning", "CompletedWithWarning")]
        ctx.writer.mark(KEY)  # later resyncs write and post nothing more
        await asyncio.sleep(0.3)
        assert len(ctx.kube.writes) == 1 and len(ctx.kube.events) == 1
        assert KEY not in ctx.cache.pods  # the result is in: the pods are no longer kept

    run(test)


def test_succeeded_is_written_without_a_result_if_the_pod_never_shows_up(monkeypatch):
    monkeypatch.setattr(writer, "QUEUE_HOLD_SECONDS", 3.0)

    async def test(ctx):
        ctx.cache.put("Job", complete_job())  # its pods were deleted before the operator saw them end
        ctx.writer.mark(KEY)
        await asyncio.sleep(0.3)
        assert ctx.kube.writes == []  # waiting for rank 0's pod, for its result
        await asyncio.sleep(2.7)  # (completionTime has whole seconds: the hold ends 1-2 s from now)
        assert [w["phase"] for _, w in ctx.kube.writes] == ["Succeeded"]
        assert "output" not in ctx.kube.writes[-1][1]

    run(test)


DATA = {"format": "instruction", "rows": 14, "invalidRows": 1, "firstInvalid": ["/d.jsonl row 13: missing field 'output'"],
        "duplicateRows": 1, "trainRows": 12, "validationRows": 1, "generalRows": 0, "maxSeqLength": 128, "truncatedRows": 0,
        "droppedRows": 0, "estimatedSteps": 2, "estimatedTokens": 600, "estimatedTrainedTokens": 40}


def test_a_data_check_that_fails_the_job_stays_in_status_with_the_failure():
    """The fetch stage reports its data check, then exits 65: status says DataError, naming the row, and
    status.data keeps the numbers although the job is final when the report is written."""
    reason = "1 invalid row(s) of 14: /d.jsonl row 13: missing field 'output'"
    failed_pod = pod(phase="Failed")
    failed_pod["status"]["initContainerStatuses"] = [
        {"name": "fetch", "state": {"terminated": {"exitCode": 65, "message": reason,
                                                   "finishedAt": "2020-01-01T00:00:09Z"}}}]
    failed_pod["status"]["containerStatuses"][0]["state"] = {"waiting": {"reason": "PodInitializing"}}

    async def test(ctx):
        ctx.cache.put("Job", job(active=1))
        ctx.cache.put("Pod", pod())
        ctx.writer.offer("team-a", "demo", "u-1", ProgressReport.model_validate(
            {"step": 0, "totalSteps": 0, "epoch": 0.0, "stage": "fetching", "data": DATA}))
        ctx.cache.put("Job", job(conditions=[{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}]))
        ctx.cache.put("Pod", failed_pod)
        ctx.writer.mark(KEY)
        await asyncio.sleep(0.3)
        final = ctx.kube.writes[-1][1]
        assert (final["phase"], final["reason"]) == ("Failed", "DataError")
        assert reason in next(c["message"] for c in final["conditions"] if c["type"] == "Failed")
        assert final["data"] == DATA

    run(test)


# ---- on the fakes of tests/unit/fakes.py: a fake clock; timers fire only when the test moves it ----


def run_on_fakes(test, **settings: Any) -> Operator:
    op = Operator(OperatorSettings(**{"status_window_seconds": 2.0, **settings}))
    finished: list[tuple[str, str]] = []
    op.writer.on_finished = finished.append  # the reconciler is not under test here

    op.cache.put("SFTJob", sftjob())
    return op.run(test)


def fresh_pod(op: Operator, phase: str = "Running", **status: Any) -> dict[str, Any]:
    p = pod(phase=phase)
    p["metadata"]["creationTimestamp"] = op.clock.stamp()
    p["status"].update(status)
    return p


def test_a_burst_within_the_window_is_one_write_at_the_windows_end():
    async def test(op):
        op.cache.put("Job", job(active=1))
        op.writer.mark(KEY)
        await op.scheduler.advance(1.0)
        op.cache.put("Pod", pod())
        op.writer.mark(KEY)  # a second change within the window: no second timer, no later write
        assert op.scheduler.delay(KEY, "status") == 1.0
        await op.scheduler.advance(0.9)
        assert op.kube.writes == []
        await op.scheduler.advance(0.1)
        assert [w["phase"] for w in op.kube.writes] == ["Running"] and op.kube.write_times == [2.0]
        op.writer.mark(KEY)  # nothing new: nothing written
        await op.scheduler.advance(60)
        assert len(op.kube.writes) == 1

    run_on_fakes(test)


@pytest.mark.parametrize("status", [409, 500, 503, 0], ids=["conflict", "server-error", "unavailable", "unreachable"])
def test_a_status_write_that_fails_is_retried_with_a_doubling_back_off(status):
    """A 409 on the status (the SFTJob changed under the write) and any error the API server may get
    over: the write is tried again after 5 s, then 10 s, and lands."""
    async def test(op):
        error = ApiError(status, "Conflict" if status == 409 else "", "the object has been modified")
        op.kube.fail("replace_status", error, error)
        op.cache.put("Job", job(active=1))
        op.cache.put("Pod", pod())
        op.writer.mark(KEY)
        await op.scheduler.advance(2.0)
        assert op.kube.writes == [] and op.scheduler.delay(KEY, "status") == 5.0
        await op.scheduler.advance(5.0)
        assert op.kube.writes == [] and op.scheduler.delay(KEY, "status") == 10.0
        await op.scheduler.advance(10.0)
        assert [w["phase"] for w in op.kube.writes] == ["Running"] and op.kube.write_times == [17.0]
        assert op.scheduler.failures == {}

    run_on_fakes(test)


@pytest.mark.parametrize("status", [422, 404], ids=["refused", "deleted"])
def test_a_refused_status_write_is_not_retried_and_the_next_mark_writes(status):
    """422: the uid precondition failed (the SFTJob was re-created) or the status broke the schema;
    retrying the same write cannot help. 404: deleted meanwhile (the watch says so too)."""
    async def test(op):
        op.kube.fail("replace_status", ApiError(status, "Invalid", "status.phase: Unsupported value"))
        op.cache.put("Job", job(active=1))
        op.cache.put("Pod", pod())
        op.writer.mark(KEY)
        await op.scheduler.advance(2.0)
        assert op.kube.writes == [] and op.scheduler.delay(KEY, "status") is None
        await op.scheduler.advance(60)  # far past when a retry would come
        assert op.kube.writes == [] and op.scheduler.failures == {}

        op.writer.mark(KEY)  # the next resync or change: written as usual
        await op.scheduler.advance(2.0)
        assert [w["phase"] for w in op.kube.writes] == ["Running"]

    run_on_fakes(test)


def test_a_finished_job_is_handed_to_the_reconciler_once_its_final_status_is_written():
    async def test(op):
        op.cache.put("Job", job(conditions=[{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]))
        op.writer.mark(KEY)
        await op.scheduler.advance(2.0)
        assert op.kube.writes[-1]["phase"] == "Failed"
        assert op.writer.on_finished.__self__ == [KEY]  # the list the test gave: stop its Job, arm the TTL
        assert [e[:2] for e in op.kube.events] == [("Warning", "Failed")]

    run_on_fakes(test)


def test_an_unschedulable_pod_stays_pending_with_the_schedulers_message_however_long_it_waits():
    """(Was a 3-second sleep in tests/integration/test_operator_lifecycle.py.) A pod no node can take
    is the queue's business, not a failed start: no start-grace period fails the job."""
    message = "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."

    async def test(op):
        fresh = job(active=1)
        fresh["metadata"]["creationTimestamp"] = op.clock.stamp()
        op.cache.put("Job", fresh)
        op.cache.put("Pod", fresh_pod(op, "Pending", conditions=[
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}],
            containerStatuses=[]))
        for _ in range(12):  # an hour, with a resync every five minutes
            op.writer.mark(KEY)
            await op.scheduler.advance(300)
            status = op.status(KEY)
            running = [c for c in status["conditions"] if c["type"] == "Running"][0]
            failed = [c for c in status["conditions"] if c["type"] == "Failed"][0]
            assert status["phase"] == "Pending" and status["reason"] == "Unschedulable"
            assert running["reason"] == "Unschedulable" and "nvidia.com/gpu" in running["message"]
            assert failed["status"] == "False"

    run_on_fakes(test, pod_start_grace_seconds=60)


def test_progress_reports_are_written_at_most_once_per_interval_and_the_newest_lands():
    async def test(op):
        op.cache.put("Job", job(active=1))
        op.cache.put("Pod", pod())
        for step in range(1, 61):  # one report every 0.1 s for 6 s
            op.writer.offer("team-a", "demo", "u-1", report(step))
            await op.scheduler.advance(0.1)
        await op.scheduler.advance(5.0)
        times = [t for t, w in zip(op.kube.write_times, op.kube.writes) if "progress" in w]
        assert len(times) >= 2 and all(b - a >= 2.0 for a, b in zip(times, times[1:])), times
        assert op.kube.writes[-1]["progress"]["step"] == 60

    run_on_fakes(test, progress_min_interval_seconds=2.0, status_window_seconds=0.5)
