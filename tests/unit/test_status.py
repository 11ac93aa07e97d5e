"""Status derivation: realistic Job and pod dicts in, the phase, reason and conditions a user reads out."""

from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from sft_operator.core import status as st
from sft_operator.core.status import Cause

from builders import T0, T1, jcond, job, pod, sftjob, terminated, waiting

NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=timezone.utc)


UNSCHEDULABLE_MSG = "0/3 nodes are available: 2 Insufficient nvidia.com/gpu, 1 node(s) had untolerated taint."
PENDING_UNSCHEDULED = pod(
    phase="Pending", state=waiting("ContainerCreating"),
    conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": UNSCHEDULABLE_MSG,
                 "lastTransitionTime": T0}],
)
PENDING_UNSCHEDULED["status"]["containerStatuses"] = []


CASES: list[tuple[str, dict, dict | None, list, str, str, str]] = [
    # id, sftjob, job, pods, phase, reason, message fragment
    ("no job yet", sftjob(), None, [], "Pending", "Creating", "creating"),
    ("job created, pod not yet scheduled", sftjob(), job(active=1), [], "Pending", "PodsStarting", "waiting"),
    ("running", sftjob(), job(active=1), [pod()], "Running", "PodsRunning", "1 trainer pod"),
    ("succeeded", sftjob(), job([jcond("SuccessCriteriaMet"), jcond("Complete")], succeeded=1,
                                 completionTime=T1), [pod(phase="Succeeded", state=terminated(0, "Completed"))],
     "Succeeded", "Completed", "finished"),
    ("oom killed, backoff exhausted", sftjob(), job([jcond("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")], failed=1),
     [pod(phase="Failed", state=terminated(137, "OOMKilled"))], "Failed", "OOMKilled", "out of memory"),
    ("data error via podFailurePolicy", sftjob(),
     job([jcond("FailureTarget", "PodFailurePolicy", "Container trainer for pod team-a/demo-0-abcde failed with exit code 65 matching FailJob rule at index 0"),
          jcond("Failed", "PodFailurePolicy", "Container trainer ... exit code 65")], failed=1),
     [pod(phase="Failed", state=terminated(65, "Error", "DataError: train.jsonl row 17: missing field 'response'"))],
     "Failed", "DataError", "row 17"),
    ("nan loss via podFailurePolicy", sftjob(), job([jcond("Failed", "PodFailurePolicy", "exit code 66")], failed=1),
     [pod(phase="Failed", state=terminated(66, "Error", "loss is NaN at step 120"))], "Failed", "NaNLoss", "NaN at step 120"),
    ("invalid config", sftjob(), job([jcond("Failed", "PodFailurePolicy", "exit code 64")], failed=1),
     [pod(phase="Failed", state=terminated(64, "Error", "hyperparameters.learningRate: must be > 0"))], "Failed", "InvalidConfig", "learningRate"),
    ("model load error", sftjob(), job([jcond("Failed", "PodFailurePolicy", "exit code 67")], failed=1),
     [pod(phase="Failed", state=terminated(67, "Error", "no such model"))], "Failed", "ModelLoadError", "no such model"),
    ("deadline exceeded", sftjob(), job([jcond("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")], failed=1),
     [], "Failed", "DeadlineExceeded", "activeDeadlineSeconds"),
    ("backoff exceeded with a plain crash", sftjob(), job([jcond("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")], failed=4),
     [pod(phase="Failed", state=terminated(1, "Error", "Traceback: boom"))], "Failed", "BackoffLimitExceeded", "exited with code 1: Traceback"),
    ("unschedulable stays pending", sftjob(), job(active=1), [PENDING_UNSCHEDULED], "Pending", "Unschedulable", "Insufficient nvidia.com/gpu"),
    ("image pull within grace", sftjob(), job(active=1),
     [pod(phase="Pending", state=waiting("ErrImagePull", "manifest unknown"),
          conditions=[{"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-11-28T11:59:00Z"}])],
     "Pending", "ErrImagePull", "manifest unknown"),
    ("image pull past grace fails", sftjob(), job(active=1),
     [pod(phase="Pending", state=waiting("ImagePullBackOff", "Back-off pulling image"), uid="pull-failing")],
     "Failed", "ImagePullFailed", "Back-off pulling image"),
    ("suspended by the user", sftjob(suspend=True), job([jcond("Suspended", "JobSuspended")], suspend=True),
     [], "Suspended", "Suspended", "runPolicy.suspend"),
    ("queued by kueue", sftjob(), job(suspend=True, labels={"kueue.x-k8s.io/queue-name": "gpu-queue"}),
     [], "Queued", "Queued", "queue gpu-queue"),
    ("evicted pod replaced: restarting", sftjob(), job(active=1),
     [pod(name="demo-0-old", phase="Failed", state=terminated(137, "Error"),
          conditions=[{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
                       "message": "Eviction API: evicting"}]),
      pod(name="demo-0-new", phase="Pending", state=waiting("ContainerCreating"))],
     "Restarting", "Restarting", "restart 1"),
    ("evicted pod replaced and running", sftjob(), job(active=1),
     [pod(name="demo-0-old", phase="Failed", state=terminated(137, "Error"),
          conditions=[{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}]),
      pod(name="demo-0-new")], "Running", "PodsRunning", "1 trainer pod"),
    ("pod deleted mid-run, still terminating", sftjob(), job(active=0, terminating=1), [pod(deleting=True)],
     "Restarting", "PodTerminating", "being deleted"),
    ("pod deleted mid-run: counted failure, replacement pending", sftjob(), job(active=1, failed=1),
     [pod(name="demo-0-new", phase="Pending", state=waiting("ContainerCreating"))], "Restarting", "Restarting", "restart 1"),
]


CLOCKS = {("pull-failing", "image"): NOW - timedelta(minutes=10)}  # first seen 10 minutes ago


@pytest.mark.parametrize("doc,job_,pods,phase,reason,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_phase_reason_message(doc, job_, pods, phase, reason, fragment):
    status = st.derive_status(doc, job_, pods, NOW, start_grace_seconds=300, start_clocks=CLOCKS)
    assert status["phase"] == phase
    summary = {"Succeeded": "Succeeded", "Failed": "Failed", "Suspended": "Suspended", "Queued": "Queued",
               "Running": "Running", "Restarting": "Restarting"}.get(phase, "Running")
    cond = st.condition(status, summary)
    assert cond["reason"] == reason
    assert fragment in cond["message"]
    if phase in ("Pending", "Running", "Restarting", "Queued", "Suspended"):
        assert st.condition(status, "Failed")["status"] == "False"
        assert st.condition(status, "Succeeded")["status"] == "False"
        assert "completionTime" not in status


def test_every_condition_type_is_present_once_with_generation_and_time():
    status = st.derive_status(sftjob(generation=4), job(active=1), [pod()], NOW)
    assert [c["type"] for c in status["conditions"]] == list(st.CONDITION_TYPES)
    for cond in status["conditions"]:
        assert cond["status"] in ("True", "False")
        assert cond["observedGeneration"] == 4
        assert cond["lastTransitionTime"] == "2026-11-28T12:00:00Z"
    assert status["observedGeneration"] == 4
    assert st.condition(status, "Created")["status"] == "True"
    assert st.condition(status, "Running")["status"] == "True"


def test_last_transition_time_kept_while_status_unchanged():
    first = st.derive_status(sftjob(), job(active=1), [pod()], NOW)
    later = NOW + timedelta(minutes=5)
    second = st.derive_status(sftjob(status=first), job(active=1), [pod()], later)
    assert second == first  # nothing changed: same times, so no write
    done = job([jcond("Complete")], succeeded=1, completionTime="2026-11-28T12:05:00Z")
    third = st.derive_status(sftjob(status=second), done, [pod(phase="Succeeded", state=terminated(0, "Completed"))], later)
    assert st.condition(third, "Running")["status"] == "False"
    assert st.condition(third, "Running")["lastTransitionTime"] == "2026-11-28T12:05:00Z"
    assert st.condition(third, "Created")["lastTransitionTime"] == "2026-11-28T12:00:00Z"
    assert st.condition(third, "Succeeded")["lastTransitionTime"] == "2026-11-28T12:05:00Z"


def test_times_and_fields():
    done = job([jcond("Complete")], succeeded=1, completionTime="2026-11-28T11:58:00Z", startTime=T0)
    status = st.derive_status(sftjob(), done, [pod(phase="Succeeded", state=terminated(0, "Completed"))], NOW,
                              effective_batch_size=16)
    assert status["startTime"] == T0  # the trainer container's start
    assert status["completionTime"] == "2026-11-28T11:58:00Z"
    assert status["effectiveBatchSize"] == 16
    assert status["jobName"] == "demo"
    assert st.duration_seconds(status) == 480


def test_failure_completion_time_is_the_job_failure_time():
    failed = job([jcond("Failed", "DeadlineExceeded", "deadline", when="2026-11-28T11:57:00Z")], failed=1)
    status = st.derive_status(sftjob(), failed, [], NOW)
    assert status["completionTime"] == "2026-11-28T11:57:00Z"


def test_creation_error_is_reported_with_the_api_message():
    error = Cause("QuotaExceeded", 'jobs.batch "demo" is forbidden: exceeded quota: gpu-quota, requested: requests.nvidia.com/gpu=8')
    status = st.derive_status(sftjob(), None, [], NOW, creation_error=error)
    created = st.condition(status, "Created")
    assert (created["status"], created["reason"]) == ("False", "QuotaExceeded")
    assert "exceeded quota" in created["message"]
    assert status["phase"] == "Pending"
    assert st.condition(status, "Running")["reason"] == "QuotaExceeded"


def test_terminal_phase_sticks_after_the_job_is_gone():
    failed = st.derive_status(sftjob(), job(active=1), [pod(phase="Pending", state=waiting("ImagePullBackOff"))],
                              NOW, start_grace_seconds=60, start_clocks={("pod-1", "image"): NOW - timedelta(minutes=1)})
    assert (failed["phase"], st.condition(failed, "Failed")["reason"]) == ("Failed", "ImagePullFailed")
    again = st.derive_status(sftjob(status=failed), None, [], NOW + timedelta(minutes=1))
    assert again == failed
    bumped = st.derive_status(sftjob(status=failed, generation=2), None, [], NOW)
    assert bumped["observedGeneration"] == 2 and bumped["phase"] == "Failed"


@pytest.mark.parametrize(
    "job_,pods,previous,expected",
    [
        (job(active=1), [pod()], 0, 0),
        (job(active=1, failed=2), [pod()], 0, 2),
        (job(active=1, failed=1), [pod()], 3, 3),  # never goes down
        (job(active=1), [pod("a", "Failed", terminated(143), [{"type": "DisruptionTarget", "status": "True"}]), pod("b")], 0, 1),
        (job([jcond("Failed", "BackoffLimitExceeded")], failed=4), [], 0, 3),  # the last failure is not a restart
        (job([jcond("Failed", "PodFailurePolicy")], failed=1), [], 0, 0),
        (job([jcond("Failed", "DeadlineExceeded")], failed=2), [], 1, 1),
        (None, [], 2, 2),
    ],
)
def test_count_restarts(job_, pods, previous, expected):
    assert st.count_restarts(job_, pods, previous) == expected


def test_restarts_are_carried_into_status():
    status = st.derive_status(sftjob(status={"restarts": 2}), job(active=1), [pod()], NOW)
    assert status["restarts"] == 2


def test_pod_failure_reads_termination_message_and_codes():
    assert st.pod_failure(pod(phase="Failed", state=terminated(65, "Error", "row 3: bad json"))).reason == "DataError"
    assert st.pod_failure(pod(phase="Failed", state=terminated(137, "OOMKilled"))).reason == "OOMKilled"
    assert st.pod_failure(pod(phase="Succeeded", state=terminated(0, "Completed"))) is None
    other = st.pod_failure(pod(phase="Failed", state=terminated(2, "Error", "oops")))
    assert (other.reason, "code 2: oops" in other.message) == ("Error", True)
    evicted = pod(phase="Failed", state={}, reason="Evicted", message="The node was low on resource: memory.")
    evicted["status"]["containerStatuses"] = []
    assert st.pod_failure(evicted).reason == "Evicted"


def test_long_messages_are_clipped():
    text = "x" * 10000
    cause = st.pod_failure(pod(phase="Failed", state=terminated(65, "Error", text)))
    assert len(cause.message) <= st.MAX_MESSAGE


def test_a_start_problem_is_timed_from_when_it_was_first_seen_not_from_scheduling():
    p = pod(phase="Pending", state=waiting("ErrImagePull", "not found"), conditions=scheduled_at(T0))
    clocks = st.track_start_clocks([p], {}, NOW - timedelta(seconds=30))
    assert clocks == {("pod-1", "image"): NOW - timedelta(seconds=30)}
    problem = st.start_problem([p], NOW, None, clocks)
    assert (problem.reason, problem.seconds) == ("ErrImagePull", 30)  # scheduled 10 minutes ago
    deleting = copy.deepcopy(p)
    deleting["metadata"]["deletionTimestamp"] = T1
    assert st.start_problem([deleting], NOW, None, clocks) is None


def test_multi_node_is_running_only_when_every_active_pod_runs():
    pods = [pod("demo-0-a"), pod("demo-1-b", phase="Pending", state=waiting("ContainerCreating"))]
    assert st.derive_status(sftjob(), job(active=2), pods, NOW)["phase"] == "Pending"
    pods[1] = pod("demo-1-b")
    assert st.derive_status(sftjob(), job(active=2), pods, NOW)["phase"] == "Running"


def test_start_time_is_kept_once_set():
    status = st.derive_status(sftjob(status={"startTime": "2026-11-28T10:00:00Z"}), job(active=1), [pod()], NOW)
    assert status["startTime"] == "2026-11-28T10:00:00Z"
    assert st.derive_status(sftjob(), job(active=1), [], NOW).get("startTime") is None


def test_time_round_trip():
    assert st.format_time(st.parse_time("2026-11-28T11:50:00.123456Z")) == "2026-11-28T11:50:00Z"
    assert st.parse_time(None) is None


def test_effective_batch_size_comes_from_the_spec_unless_the_trainer_reported_one():
    assert st.derive_status(sftjob(), job(active=1), [pod()], NOW, effective_batch_size=16)["effectiveBatchSize"] == 16
    reported = sftjob(status={"phase": "Running", "effectiveBatchSize": 32})
    assert st.derive_status(reported, job(active=1), [pod()], NOW, effective_batch_size=16)["effectiveBatchSize"] == 32


def test_pods_finished_before_the_job_completes_stay_running():
    previous = st.derive_status(sftjob(), job(active=1), [pod()], NOW)
    done = [pod(phase="Succeeded", state=terminated(0, "Completed"))]
    status = st.derive_status(sftjob(status=previous), job(active=0), done, NOW)
    assert (status["phase"], st.condition(status, "Running")["reason"]) == ("Running", "PodsCompleted")


def test_a_failed_pod_before_the_job_decides_keeps_the_phase():
    previous = st.derive_status(sftjob(), job(active=1), [pod()], NOW)
    failed = [pod(phase="Failed", state=terminated(1, "Error", "boom"))]
    status = st.derive_status(sftjob(status=previous), job(active=0), failed, NOW)
    assert status["phase"] == "Running"
    assert st.condition(status, "Running")["reason"] == "PodFailed"
    assert "code 1: boom" in st.condition(status, "Running")["message"]


def test_pods_the_job_cannot_create_are_reported_with_the_quota_message():
    message = 'Error creating: pods "demo-0-x" is forbidden: exceeded quota: gpus, requested: requests.nvidia.com/gpu=8, used: requests.nvidia.com/gpu=0, limited: requests.nvidia.com/gpu=4'
    cause = st.pod_creation_cause(message)
    assert cause.reason == "QuotaExceeded"
    status = st.derive_status(sftjob(), job(), [], NOW, pod_creation_error=cause)
    assert status["phase"] == "Pending"
    running = st.condition(status, "Running")
    assert running["reason"] == "QuotaExceeded" and "limited: requests.nvidia.com/gpu=4" in running["message"]
    # Once pods exist, the old error no longer speaks for them.
    assert st.derive_status(sftjob(), job(active=1), [pod()], NOW, pod_creation_error=cause)["phase"] == "Running"
    assert st.pod_creation_cause("Error creating: pods is forbidden: PodSecurity").reason == "Forbidden"
    assert st.pod_creation_cause("Error creating: Internal error").reason == "FailedCreate"


# ---- defect 3: pods that never start are named, then failed after the grace period -------------


def scheduled_at(when: str) -> list[dict[str, Any]]:
    return [{"type": "PodScheduled", "status": "True", "lastTransitionTime": when}]


@pytest.mark.parametrize("reason", ["CreateContainerConfigError", "CreateContainerError"])
def test_a_container_the_kubelet_cannot_create_is_named_then_fails(reason):
    message = "couldn't find key tokn in Secret team-a/hf-token"
    stuck = pod(phase="Pending", state=waiting(reason, message), conditions=scheduled_at(T0))
    clocks = st.track_start_clocks([stuck], {}, NOW - timedelta(seconds=60))  # first seen a minute ago
    status = st.derive_status(sftjob(), job(active=1), [stuck], NOW, start_grace_seconds=300, start_clocks=clocks)
    running = st.condition(status, "Running")
    assert (status["phase"], status["reason"], running["reason"]) == ("Pending", reason, reason)
    assert "couldn't find key tokn" in running["message"]
    assert "the job fails if this lasts until 2026-11-28T12:04:00Z" in running["message"]
    # the message names a time, not the seconds left: a later derive writes nothing new
    later = st.derive_status(sftjob(status=status), job(active=1), [stuck], NOW + timedelta(seconds=30),
                             start_grace_seconds=300, start_clocks=clocks)
    assert st.condition(later, "Running")["message"] == running["message"]
    assert st.recheck_seconds([stuck], NOW, 300, None, clocks) == 240
    failed = st.derive_status(sftjob(), job(active=1), [stuck], NOW + timedelta(seconds=240), start_grace_seconds=300,
                              start_clocks=clocks)
    assert (failed["phase"], st.condition(failed, "Failed")["reason"]) == ("Failed", reason)
    assert "hf-token" in st.condition(failed, "Failed")["message"]


@pytest.mark.parametrize(
    ("event_reason", "message", "reason"),
    [
        ("FailedMount", 'MountVolume.SetUp failed for volume "config" : configmap "demo-config" not found', "FailedMount"),
        ("FailedAttachVolume", 'Multi-Attach error for volume "pvc-1" Volume is already used by pod(s) demo-0-x',
         "MultiAttach"),
    ],
)
def test_a_volume_that_cannot_be_mounted_is_named_then_fails(event_reason, message, reason):
    stuck = pod(phase="Pending", state=waiting("ContainerCreating"), conditions=scheduled_at("2026-11-28T11:58:00Z"))
    problems = {"pod-1": st.volume_cause(event_reason, message, since=st.parse_time("2026-11-28T11:58:00Z"))}
    status = st.derive_status(sftjob(), job(active=1), [stuck], NOW, start_grace_seconds=300, pod_problems=problems)
    assert (status["phase"], status["reason"]) == ("Pending", reason)
    assert message[:20] in st.condition(status, "Running")["message"]
    later = NOW + timedelta(minutes=4)
    failed = st.derive_status(sftjob(), job(active=1), [stuck], later, start_grace_seconds=300, pod_problems=problems)
    assert (failed["phase"], st.condition(failed, "Failed")["reason"]) == ("Failed", reason)
    # without the event it is just a pod starting
    assert st.derive_status(sftjob(), job(active=1), [stuck], later)["reason"] == "PodsStarting"


# ---- issue 19 defect 3: each start problem is timed from when it began and clears when the pod moves on ----


def test_a_transient_failed_mount_does_not_fail_a_fetch_that_runs_past_the_grace():
    """A FailedMount at the start, then a fetch of a large model that runs 10 minutes: the volume was
    mounted (the fetch stage runs), so the old event no longer speaks for the pod."""
    fetching = fetching_pod({"running": {"startedAt": "2026-11-28T11:50:30Z"}})
    fetching["status"]["conditions"] = scheduled_at(T0)
    problems = {"pod-1": st.volume_cause("FailedMount", 'MountVolume.SetUp failed for volume "cache": timed out')}
    status = st.derive_status(sftjob(), job(active=1), [fetching], NOW, start_grace_seconds=300, pod_problems=problems)
    assert (status["phase"], status["reason"]) == ("Running", "Fetching")
    assert st.recheck_seconds([fetching], NOW, 300, problems) is None


def test_multi_attach_until_the_six_minute_force_detach_does_not_fail_the_job():
    """After a node loss the replacement pod waits for the attach-detach controller's force-detach (6
    minutes): a recoverable job, within the default grace."""
    from sft_operator.runtime.settings import OperatorSettings

    grace = OperatorSettings().pod_start_grace_seconds
    began = NOW - timedelta(minutes=6, seconds=30)
    stuck = pod(phase="Pending", state=waiting("ContainerCreating"), conditions=scheduled_at(st.format_time(began)))
    events = [event("FailedAttachVolume", 'Multi-Attach error for volume "pvc-1" Volume is already exclusively '
                    "attached to one node and can't be attached to another", began, NOW - timedelta(seconds=20))]
    problems = {"pod-1": st.volume_problem(events)}
    status = st.derive_status(sftjob(), job(active=1), [stuck], NOW, start_grace_seconds=grace, pod_problems=problems)
    assert (status["phase"], status["reason"]) == ("Pending", "MultiAttach")
    # the attach then succeeds: the problem is over even before the pod's status says more
    attached = events + [event("SuccessfulAttachVolume", 'AttachVolume.Attach succeeded for volume "pvc-1"', NOW, NOW,
                               kind="Normal")]
    assert st.volume_problem(attached) is None


def test_a_slow_pull_of_our_image_with_one_transient_error_does_not_fail_the_job():
    """The 6.6 GB trainer image pulls for 5 minutes (ContainerCreating: no problem), then one ErrImagePull:
    its clock starts there, and the retried pull has the whole grace."""
    from sft_operator.runtime.settings import OperatorSettings

    grace = OperatorSettings().pod_start_grace_seconds
    scheduled = NOW - timedelta(minutes=5)
    pulling = pod(phase="Pending", state=waiting("ContainerCreating"), conditions=scheduled_at(st.format_time(scheduled)))
    clocks = st.track_start_clocks([pulling], {}, scheduled + timedelta(seconds=10))
    assert clocks == {}  # pulling is no problem
    failed_once = copy.deepcopy(pulling)
    failed_once["status"]["containerStatuses"][0]["state"] = waiting("ErrImagePull", "read tcp: i/o timeout")
    clocks = st.track_start_clocks([failed_once], clocks, NOW)
    status = st.derive_status(sftjob(), job(active=1), [failed_once], NOW, start_grace_seconds=grace,
                              start_clocks=clocks)
    assert (status["phase"], status["reason"]) == ("Pending", "ErrImagePull")
    # the kubelet retries: ImagePullBackOff, then the whole image again (5 more minutes), then it runs
    backoff = copy.deepcopy(failed_once)
    backoff["status"]["containerStatuses"][0]["state"] = waiting("ImagePullBackOff", "Back-off pulling image")
    later = NOW + timedelta(minutes=5, seconds=10)
    clocks = st.track_start_clocks([backoff], clocks, later)
    assert clocks == {("pod-1", "image"): NOW}  # one problem, timed from its first sight
    status = st.derive_status(sftjob(status=status), job(active=1), [backoff], later, start_grace_seconds=grace,
                              start_clocks=clocks)
    assert status["phase"] == "Pending"
    running = pod(conditions=scheduled_at(st.format_time(scheduled)))
    assert st.track_start_clocks([running], clocks, later) == {}  # cleared: the next problem starts a new clock


def test_an_image_pull_back_off_that_lasts_the_grace_fails_naming_the_image():
    stuck = pod(phase="Pending", state=waiting("ImagePullBackOff", 'Back-off pulling image "ghcr.io/x/trainer:9"'))
    clocks = {("pod-1", "image"): NOW - timedelta(seconds=900)}
    status = st.derive_status(sftjob(), job(active=1), [stuck], NOW, start_grace_seconds=900, start_clocks=clocks)
    failed = st.condition(status, "Failed")
    assert (status["phase"], failed["reason"]) == ("Failed", "ImagePullFailed")
    assert failed["message"].startswith("image ghcr.io/sft-operator/trainer:0.1.0: Back-off pulling image")
    assert "failing for 900s, grace 900s" in failed["message"]


def test_a_volume_problem_is_timed_from_its_first_event_and_ends_when_a_later_event_shows_progress():
    mount = 'MountVolume.SetUp failed for volume "cache" : rpc error: timed out'
    first, last = NOW - timedelta(minutes=3), NOW - timedelta(seconds=40)
    events = [event("FailedMount", mount, first, last), event("Scheduled", "assigned", first, first, kind="Normal")]
    cause = st.volume_problem(events)
    assert (cause.reason, cause.since) == ("FailedMount", first)
    assert st.volume_problem(events + [event("Pulling", "Pulling image", NOW, NOW, kind="Normal")]) is None
    assert st.volume_problem([event("Pulled", "pulled", first, first, kind="Normal")]) is None
    # new-style events carry eventTime and series instead of first/lastTimestamp
    series = {"type": "Warning", "reason": "FailedMount", "message": mount, "eventTime": "2026-11-28T11:57:00.000000Z",
              "series": {"count": 3, "lastObservedTime": "2026-11-28T11:59:00.000000Z"}}
    assert st.volume_problem([series]).since == st.parse_time("2026-11-28T11:57:00Z")


def event(reason: str, message: str, first: datetime, last: datetime, kind: str = "Warning") -> dict[str, Any]:
    return {"type": kind, "reason": reason, "message": message, "count": 2,
            "firstTimestamp": st.format_time(first), "lastTimestamp": st.format_time(last)}


def test_events_are_looked_up_for_a_job_without_pods_and_a_scheduled_pod_that_does_not_start():
    fresh_job = job(active=1)
    fresh_job["metadata"].update(uid="job-1", creationTimestamp="2026-11-28T11:59:58Z")
    (lookup,) = st.lookups(fresh_job, [], NOW)
    assert (lookup.kind, lookup.uid, lookup.after_seconds) == ("Job", "job-1", 8.0)
    stuck = pod(phase="Pending", state=waiting("ContainerCreating"), conditions=scheduled_at("2026-11-28T11:59:55Z"))
    (lookup,) = st.lookups(fresh_job, [stuck], NOW)
    assert (lookup.kind, lookup.uid, lookup.after_seconds) == ("Pod", "pod-1", 5.0)
    assert st.lookups(fresh_job, [pod()], NOW) == []  # running: nothing to explain
    assert st.lookups(job([jcond("Complete")]), [], NOW) == []


# ---- defect 1 and 7: what no retry fixes fails the job -----------------------------------------


@pytest.mark.parametrize("reason", ["NameConflict", "InvalidSpec"])
def test_a_final_creation_error_fails_the_job_with_its_reason(reason):
    error = Cause(reason, "Service team-a/demo already exists and is not created by this SFTJob")
    status = st.derive_status(sftjob(), None, [], NOW, creation_error=error)
    assert (status["phase"], status["reason"]) == ("Failed", reason)
    failed = st.condition(status, "Failed")
    assert (failed["status"], failed["reason"]) == ("True", reason) and "Service team-a/demo" in failed["message"]
    assert st.condition(status, "Created")["status"] == "False"


# ---- defect 9: exit 75 from any rank is a disruption -------------------------------------------


def test_interrupted_ranks_count_as_restarts_not_failures():
    interrupted = [pod(f"demo-{i}-a", "Failed", terminated(75, "Error", "interrupted: checkpoint saved")) for i in range(3)]
    replacements = [pod(f"demo-{i}-b", phase="Pending", state=waiting("ContainerCreating")) for i in range(3)]
    assert st.count_restarts(job(active=3), interrupted) == 3
    status = st.derive_status(sftjob(), job(active=3), interrupted + replacements, NOW)
    assert (status["phase"], status["restarts"]) == ("Restarting", 3)


def test_the_column_reason_says_why_the_job_waits():
    status = st.derive_status(sftjob(), job(active=1), [PENDING_UNSCHEDULED], NOW)
    assert (status["phase"], status["reason"]) == ("Pending", "Unschedulable")


# ---- defect 5: the result in the termination message -------------------------------------------


RESULT = ('{"outputModel":"pvc://models/demo/model","bestCheckpoint":"pvc://models/demo/checkpoints/checkpoint-90",'
          '"steps":100,"totalSteps":100,"epochs":3.0,"trainLoss":0.8,"evalLoss":0.9,"bestEvalLoss":0.85}')


def test_the_result_of_rank_zero_is_read_from_its_termination_message():
    done = pod(phase="Succeeded", state=terminated(0, "Completed", RESULT))
    result = st.result_from_pods([done])
    assert (result.output_model, result.best_eval_loss) == ("pvc://models/demo/model", 0.85)
    other_rank = copy.deepcopy(done)
    other_rank["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] = "1"
    assert st.result_from_pods([other_rank]) is None
    assert st.result_from_pods([pod(phase="Succeeded", state=terminated(0, "Completed", "done"))]) is None
    newer = '{"outputModel":"pvc://x/model","futureField":1}'  # a newer trainer's extra field is ignored
    assert st.result_from_pods([pod(phase="Succeeded", state=terminated(0, "Completed", newer))]).output_model == "pvc://x/model"


def test_a_result_without_steps_keeps_the_reported_progress_and_completes_it():
    reported = {"phase": "Succeeded", "progress": {"percent": 98, "step": 294, "totalSteps": 300, "epoch": 2.9,
                                                   "etaSeconds": 3}}
    result = st.result_from_pods([pod(phase="Succeeded", state=terminated(0, "Completed", '{"outputUri":"s3://b/run"}'))])
    status = st.with_result(reported, result)
    assert status["progress"] == {"percent": 100, "step": 294, "totalSteps": 300, "epoch": 2.9, "etaSeconds": 0}
    assert status["output"] == {"uri": "s3://b/run"}


def test_with_result_completes_output_metrics_and_progress():
    result = st.result_from_pods([pod(phase="Succeeded", state=terminated(0, "Completed", RESULT))])
    status = st.with_result({"phase": "Succeeded", "metrics": {"learningRate": 1e-5, "trainLoss": 1.0}}, result)
    assert status["output"] == {"model": "pvc://models/demo/model", "bestCheckpoint": "pvc://models/demo/checkpoints/checkpoint-90"}
    assert status["metrics"] == {"learningRate": 1e-5, "trainLoss": 0.8, "evalLoss": 0.9, "bestEvalLoss": 0.85}
    assert status["progress"] == {"percent": 100, "step": 100, "totalSteps": 100, "epoch": 3.0, "etaSeconds": 0}


def test_with_progress_maps_a_report_onto_status_keeping_earlier_metrics():
    from sft_contract.messages import ProgressReport

    first = st.with_progress({"phase": "Running"}, ProgressReport.model_validate(
        {"step": 50, "totalSteps": 100, "epoch": 1.0, "trainLoss": 1.5, "evalLoss": 1.1, "etaSeconds": 120,
         "effectiveBatchSize": 16}))
    assert first == {"phase": "Running", "progress": {"percent": 50, "step": 50, "totalSteps": 100, "epoch": 1.0,
                                                      "etaSeconds": 120, "stage": "Training"},
                     "metrics": {"trainLoss": 1.5, "evalLoss": 1.1}, "effectiveBatchSize": 16}
    second = st.with_progress(first, ProgressReport.model_validate({"step": 100, "totalSteps": 100, "epoch": 2.0,
                                                                    "outputModel": "pvc://m/out"}))
    assert second["progress"]["etaSeconds"] == 0 and second["metrics"] == {"trainLoss": 1.5, "evalLoss": 1.1}
    assert second["output"] == {"model": "pvc://m/out"}
    from sft_operator.api.types import SFTJobStatus

    SFTJobStatus.model_validate(second)  # fits the CRD's schema


def test_every_run_metric_a_trainer_sends_shows_in_status_metrics():
    """RunMetrics is the one list: each metric of a progress report or of the result lands in status.metrics under
    the same camelCase name, and status.metrics takes exactly those (the CRD's schema)."""
    from sft_contract.messages import ProgressReport, RunMetrics, TrainerResult
    from sft_operator.api.types import SFTJobStatus

    values = {info.alias: (i + 1) / 10 for i, info in enumerate(RunMetrics.model_fields.values())}
    assert set(values) == {"trainLoss", "evalLoss", "bestEvalLoss", "learningRate", "tokensPerSecond",
                           "generalLossBefore", "generalLossAfter"}
    report = ProgressReport.model_validate({"step": 1, "totalSteps": 2, "epoch": 0.5, **values})
    assert st.with_progress({"phase": "Running"}, report)["metrics"] == values
    finished = st.with_result({"phase": "Succeeded"}, TrainerResult.model_validate({"outputModel": "pvc://m/o", **values}))
    assert finished["metrics"] == values
    SFTJobStatus.model_validate(finished)


# ---- transition: what follows a change ----------------------------------------------------------


def test_transition_posts_events_only_for_what_a_person_acts_on():
    pending = st.derive_status(sftjob(), job(active=1), [], NOW)
    running = st.derive_status(sftjob(status=pending), job(active=1), [pod()], NOW)
    effects = st.transition(pending, running)
    assert effects.events == () and effects.started
    done = st.derive_status(sftjob(status=running), job([jcond("Complete")], completionTime=T1),
                            [pod(phase="Succeeded", state=terminated(0, "Completed"))], NOW)
    effects = st.transition(running, done)
    assert effects.events == () and (effects.finished.result, effects.finished.reason) == ("Succeeded", "Completed")
    failed = st.derive_status(sftjob(status=running), job([jcond("Failed", "BackoffLimitExceeded")], failed=1),
                              [pod(phase="Failed", state=terminated(137, "OOMKilled"))], NOW)
    effects = st.transition(running, failed)
    assert [(e.type, e.reason) for e in effects.events] == [("Warning", "Failed")]
    assert "OOMKilled" in effects.events[0].message
    assert st.transition(failed, failed) == st.Effects()  # nothing changed, nothing follows
    quota = st.derive_status(sftjob(), None, [], NOW, creation_error=Cause("QuotaExceeded", "exceeded quota: jobs"))
    assert [e.reason for e in st.transition({}, quota).events] == ["QuotaExceeded"]
    assert st.transition(quota, quota).events == ()


def test_moments_every_healthy_job_passes_through_may_wait_unwritten():
    settle = {"queue_seconds": 60, "starting_seconds": 30}
    fresh_job = job(active=1)
    fresh_job["metadata"]["creationTimestamp"] = "2026-11-28T11:59:58Z"
    # no pods yet: waiting on the Job controller's queue (long in a burst), as on the operator's own
    starting = st.derive_status(sftjob(), fresh_job, [], NOW)
    assert starting["reason"] == "PodsStarting"
    assert st.settle_until({}, starting, sftjob(), fresh_job, [], **settle) == st.parse_time("2026-11-28T12:00:58Z")
    creating = {"phase": "Pending", "reason": "Creating"}  # written when the children took long: no reason to write again
    assert st.settle_until(creating, starting, sftjob(), fresh_job, [], **settle) == st.parse_time("2026-11-28T12:00:58Z")
    # a pod starting: written if it has not started 30 s after its creation
    new_pod = pod(phase="Pending", state=waiting("ContainerCreating"), conditions=scheduled_at("2026-11-28T11:59:59Z"))
    new_pod["metadata"]["creationTimestamp"] = "2026-11-28T11:59:59Z"
    assert st.derive_status(sftjob(), fresh_job, [new_pod], NOW)["reason"] == "PodsStarting"
    assert st.settle_until({}, starting, sftjob(), fresh_job, [new_pod], **settle) == st.parse_time("2026-11-28T12:00:29Z")
    # after a problem was shown, or when there is something to say, it is written at once
    unschedulable = {"phase": "Pending", "reason": "Unschedulable"}
    assert st.settle_until(unschedulable, starting, sftjob(), fresh_job, [new_pod], **settle) is None
    running = st.derive_status(sftjob(), fresh_job, [pod()], NOW)
    assert st.settle_until({}, running, sftjob(), fresh_job, [pod()], **settle) is None
    blocked = st.derive_status(sftjob(), fresh_job, [PENDING_UNSCHEDULED], NOW)
    assert st.settle_until({}, blocked, sftjob(), fresh_job, [PENDING_UNSCHEDULED], **settle) is None
    # pods done, the Job not yet Complete: the Running already written stays until Succeeded follows
    done = [pod(phase="Succeeded", state=terminated(0, "Completed"))]
    completing = st.derive_status(sftjob(status=running), job(active=0), done, NOW)
    assert completing["reason"] == "PodsCompleted"
    # (the Job controller's queue: long in a burst)
    assert st.settle_until(running, completing, sftjob(), job(), done, **settle) == st.parse_time(T1) + timedelta(seconds=60)


# ---- the fetch stage (an init container), its failures, the stage in progress, a result's warning ----


def fetching_pod(init_state: dict[str, Any], phase: str = "Pending") -> dict[str, Any]:
    """A pod whose fetch init container is in ``init_state`` (the trainer waits: PodInitializing)."""
    p = pod(phase=phase, state=waiting("PodInitializing"))
    p["status"]["initContainerStatuses"] = [{"name": "fetch", "image": "ghcr.io/sft-operator/trainer:0.1.0",
                                             "ready": False, "restartCount": 0, "state": init_state}]
    return p


def test_a_pod_in_its_fetch_stage_is_running_with_reason_fetching():
    status = st.derive_status(sftjob(), job(active=1), [fetching_pod({"running": {"startedAt": T0}})], NOW)
    assert (status["phase"], status["reason"]) == ("Running", "Fetching")
    running = st.condition(status, "Running")
    assert running["status"] == "True" and "fetching the model and data" in running["message"]
    # one pod fetching while the other (multi-node) already trains: still fetching
    both = st.derive_status(sftjob(), job(active=2), [fetching_pod({"running": {"startedAt": T0}}), pod()], NOW)
    assert both["reason"] == "Fetching"
    # no events are read for a pod whose volumes are mounted (its init container runs)
    assert [lk.kind for lk in st.lookups(job(active=1), [fetching_pod({"running": {"startedAt": T0}})], NOW)] == []


def test_a_terminal_fetch_failure_fails_the_job_naming_the_object_and_uses_no_retry():
    message = ("s3://team-data/base/model: access denied (SignatureDoesNotMatch: the signature does not match); "
               "check the credentials in spec.storage.s3.credentialsSecretRef and their permissions on the bucket")
    failed_pod = fetching_pod(terminated(77, message=message), phase="Failed")
    status = st.derive_status(sftjob(), job([jcond("Failed", "PodFailurePolicy", "Container fetch for pod "
                                                   "team-a/demo-0-abcde failed with exit code 77 matching FailJob rule at index 1")],
                                            failed=1), [failed_pod], NOW)
    failed = st.condition(status, "Failed")
    assert (status["phase"], status["reason"], failed["reason"]) == ("Failed", "AccessDenied", "AccessDenied")
    assert "the fetch stage of pod demo-0-abcde exited with code 77: s3://team-data/base/model: access denied" in failed["message"]
    assert status["restarts"] == 0
    missing = fetching_pod(terminated(68, message="s3://team-data/data/x.jsonl: not found (NoSuchKey: no such object)"),
                           phase="Failed")
    status = st.derive_status(sftjob(), job([jcond("Failed", "PodFailurePolicy")], failed=1), [missing], NOW)
    assert status["reason"] == "NotFound" and "s3://team-data/data/x.jsonl: not found" in st.condition(status, "Failed")["message"]


def test_a_fetch_image_that_cannot_be_pulled_is_a_start_problem():
    stuck = fetching_pod(waiting("ErrImagePull", "pull access denied"))
    status = st.derive_status(sftjob(), job(active=1), [stuck], NOW, start_grace_seconds=3600)
    assert (status["phase"], status["reason"]) == ("Pending", "ErrImagePull")


def test_fetching_reports_show_the_stage_and_bytes_and_a_result_clears_them():
    from sft_contract.messages import ProgressReport, TrainerResult

    fetching = st.with_progress({"phase": "Running"}, ProgressReport.model_validate(
        {"step": 0, "totalSteps": 0, "epoch": 0.0, "stage": "fetching", "bytesDone": 1024, "bytesTotal": 4096}))
    assert fetching["progress"] == {"percent": 0, "step": 0, "totalSteps": 0, "epoch": 0.0, "stage": "Fetching",
                                    "bytesDone": 1024, "bytesTotal": 4096}
    exporting = st.with_progress(fetching, ProgressReport.model_validate(
        {"step": 10, "totalSteps": 10, "epoch": 1.0, "stage": "exporting", "bytesDone": 5, "bytesTotal": 9}))
    assert (exporting["progress"]["stage"], exporting["progress"]["percent"]) == ("Exporting", 100)
    done = st.with_result({**exporting, "conditions": []}, TrainerResult(output_model="s3://b/run/model", steps=10))
    assert not {"stage", "bytesDone", "bytesTotal"} & set(done["progress"])
    from sft_operator.api.types import SFTJobStatus

    SFTJobStatus.model_validate(fetching)  # declared in the CRD: the API server would prune it otherwise


def test_the_data_check_report_becomes_status_data_and_outlives_the_training_reports():
    from sft_operator.api.types import SFTJobStatus
    from sft_contract.messages import ProgressReport

    data = {"format": "messages", "rows": 500, "invalidRows": 0, "duplicateRows": 3, "trainRows": 450,
            "validationRows": 50, "generalRows": 0, "maxSeqLength": 2048, "truncatedRows": 7, "droppedRows": 0,
            "tokenLengths": {"min": 12, "p50": 300, "p95": 1900, "max": 4100, "mean": 420.5},
            "estimatedSteps": 170, "estimatedTokens": 567000, "estimatedTrainedTokens": 201000}
    checked = st.with_progress({"phase": "Running"}, ProgressReport.model_validate(
        {"step": 0, "totalSteps": 0, "epoch": 0.0, "stage": "fetching", "data": data}))
    assert checked["data"] == data
    training = st.with_progress(checked, ProgressReport.model_validate({"step": 5, "totalSteps": 170, "epoch": 0.1}))
    assert training["data"] == data and training["progress"]["totalSteps"] == 170
    SFTJobStatus.model_validate(training)  # declared in the CRD: the API server would prune it otherwise


def test_a_result_with_a_warning_succeeds_says_so_and_posts_one_warning_event():
    from sft_contract.messages import TrainerResult

    running = st.derive_status(sftjob(), job(active=1), [pod()], NOW)
    done = st.derive_status(sftjob(status=running), job([jcond("Complete")], completionTime=T1),
                            [pod(phase="Succeeded", state=terminated(0, "Completed"))], NOW)
    warning = "MLflow at http://mlflow:5000: could not start the run: ConnectionError: refused; training goes on"
    result = TrainerResult(output_model="s3://b/run/model", output_uri="s3://b/run", mlflow_run_id=None, warning=warning)
    after = st.with_result(done, result)
    assert after["phase"] == "Succeeded" and after["output"]["uri"] == "s3://b/run"
    assert st.condition(after, "Succeeded")["message"] == f"training finished; warning: {warning}"
    effects = st.transition(running, after, result.warning)
    assert [(e.type, e.reason, e.message) for e in effects.events] == [("Warning", "CompletedWithWarning", warning)]
    assert st.transition(running, st.with_result(done, TrainerResult(output_model="m")), None).events == ()


def workload(*conditions: dict) -> dict:
    return {"metadata": {"name": "job-demo-abcde"}, "status": {"conditions": list(conditions)}}


@pytest.mark.parametrize("wl,reason,message", [
    (None, "Queued", ""),
    (workload({"type": "QuotaReserved", "status": "False", "reason": "Pending",
               "message": "couldn't assign flavors to pod set main: insufficient quota for nvidia.com/gpu"}),
     "Queued", "couldn't assign flavors to pod set main: insufficient quota for nvidia.com/gpu"),
    (workload({"type": "Evicted", "status": "True", "reason": "Preempted",
               "message": "Preempted to accommodate a workload (UID: u1) due to prioritization in the ClusterQueue"},
              {"type": "QuotaReserved", "status": "False", "reason": "Pending", "message": "insufficient quota"}),
     "Preempted", "Preempted to accommodate a workload (UID: u1) due to prioritization in the ClusterQueue; "
                  "insufficient quota"),
    (workload({"type": "QuotaReserved", "status": "True", "reason": "QuotaReserved",
               "message": "Quota reserved in ClusterQueue gpus"}), "Queued", "Quota reserved in ClusterQueue gpus"),
], ids=["no workload", "waiting for quota", "preempted, waiting again", "admitted, not started yet"])
def test_a_job_kueue_holds_is_explained_in_kueues_words(wl, reason, message):
    assert st.queue_state(wl) == (reason, message)
    queued = job(suspend=True, labels={"kueue.x-k8s.io/queue-name": "gpus"})
    status = st.derive_status(sftjob(), queued, [], NOW, queue_workload=wl)
    cond = st.condition(status, "Queued")
    assert (status["phase"], cond["reason"]) == ("Queued", reason)
    assert cond["message"] == (f"queue gpus (Kueue): {message}" if message
                               else "the trainer Job is suspended until queue gpus admits it")
