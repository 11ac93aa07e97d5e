"""The phase and the cluster-derived status (``OWNED_FIELDS``) of an SFTJob, from its Job and pods, and
how long a passing state may wait unwritten (pure)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from pydantic import ValidationError

from sft_operator.api.types import TERMINAL_PHASES, PlatformDefaults
from sft_operator.core.render import ANNOTATION_APPLIED_DEFAULTS
from sft_operator.core.status.conditions import conditions_for, merge_conditions
from sft_operator.core.status.pods import (
    count_restarts,
    failed_pods,
    finished_at,
    is_active,
    is_fetching,
    is_ignored_failure,
    job_condition,
    job_failure,
    pod_failure,
    trainer_start_time,
    unschedulable,
)
from sft_operator.core.status.reported import result_pods
from sft_operator.core.status.start_problems import start_problem
from sft_operator.core.status.vocabulary import (
    FAILED,
    PENDING,
    QUEUED,
    RESTARTING,
    RUNNING,
    SUCCEEDED,
    SUSPENDED,
    Cause,
    Observation,
    as_int,
    format_time,
    parse_time,
)

OWNED_FIELDS = (
    "observedGeneration",
    "phase",
    "reason",
    "conditions",
    "startTime",
    "completionTime",
    "restarts",
    "effectiveBatchSize",
    "jobName",
    "appliedDefaults",
)
FETCHING = "Fetching"  # the fetch stage (init container) fills the cache


def _newer(pod: dict[str, Any], others: list[dict[str, Any]]) -> bool:
    """Whether ``pod`` ended after all of ``others``."""
    return all(finished_at(pod) > finished_at(o) for o in others)


class QueueState(NamedTuple):
    reason: str  # Queued or Preempted
    message: str


def queue_state(workload: Mapping[str, Any] | None) -> QueueState:
    """Reason and message of a Job that Kueue holds, in Kueue's own words (its Workload's conditions):
    why it waits (QuotaReserved False: which quota is short), and why it stopped when it was preempted or
    evicted. ("Queued", "") without a Workload (Kueue not installed, or not created yet)."""
    conditions = {c.get("type"): c for c in ((workload or {}).get("status") or {}).get("conditions") or []}
    waiting = conditions.get("QuotaReserved") or {}
    evicted = conditions.get("Evicted") or {}
    parts = []
    if evicted.get("status") == "True" and evicted.get("message"):
        parts.append(evicted["message"])
    if waiting.get("status") == "False" and waiting.get("message"):
        parts.append(waiting["message"])
    elif waiting.get("status") == "True":
        parts.append(waiting.get("message") or "quota reserved; starting")
    reason = "Preempted" if evicted.get("status") == "True" and evicted.get("reason") == "Preempted" else "Queued"
    return QueueState(reason=reason, message="; ".join(parts))


def observe(
    sftjob: dict[str, Any],
    job: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    now: datetime,
    *,
    start_grace_seconds: float,
    creation_error: Cause | None = None,
    pod_creation_error: Cause | None = None,
    pod_problems: Mapping[str, Cause] | None = None,
    start_clocks: Mapping[tuple[str, str], datetime] | None = None,
    replaced_pods: Collection[str] = (),
    queue_workload: Mapping[str, Any] | None = None,
) -> Observation:
    """Phase, reason and message from the Job and its pods (not terminal-latched; see derive_status)."""
    previous = sftjob.get("status") or {}
    restarts = count_restarts(job, pods, as_int(previous.get("restarts")), replaced_pods)

    def seen(phase: str, reason: str, message: str, **more: Any) -> Observation:  # with the restarts counted above
        return Observation(phase=phase, reason=reason, message=message, restarts=restarts, **more)

    if creation_error is not None and creation_error.final:
        return seen(FAILED, creation_error.reason, creation_error.message, created=creation_error)
    if job is None:
        if creation_error is not None:
            return seen(PENDING, creation_error.reason, creation_error.message, created=creation_error)
        return seen(PENDING, "Creating", "creating the trainer Job", created=Cause("Creating", "creating children"))

    if job_condition(job, "Complete") or job_condition(job, "SuccessCriteriaMet"):
        return seen(SUCCEEDED, "Completed", "training finished")
    failure = job_failure(job, pods)
    if failure is not None:
        return seen(FAILED, failure.reason, failure.message)

    run_policy = (sftjob.get("spec") or {}).get("runPolicy") or {}
    if (job.get("spec") or {}).get("suspend"):
        if run_policy.get("suspend"):
            return seen(SUSPENDED, "Suspended", "runPolicy.suspend is true; the trainer pods are removed")
        queue = ((job.get("metadata") or {}).get("labels") or {}).get("kueue.x-k8s.io/queue-name")
        where = f"queue {queue}" if queue else "its queue"
        queued = queue_state(queue_workload)
        if queued.message:
            return seen(QUEUED, queued.reason, f"{where} (Kueue): {queued.message}")
        return seen(QUEUED, queued.reason, f"the trainer Job is suspended until {where} admits it")

    active = [p for p in pods if is_active(p)]
    waiting_phase = RESTARTING if restarts else PENDING
    if not active and pod_creation_error is not None:
        # The Job exists but cannot create its pods (a GPU ResourceQuota, admission): say why.
        return seen(waiting_phase, pod_creation_error.reason, pod_creation_error.message)
    problem = start_problem(active, now, pod_problems, start_clocks)
    if problem is not None:
        if problem.seconds >= start_grace_seconds:
            return seen(
                FAILED,
                problem.failed_reason,
                f"{problem.message} (failing for {int(problem.seconds)}s, grace {int(start_grace_seconds)}s)",
            )
        # A time, not the seconds left: the message (and so the status) stays the same while the problem lasts.
        until = format_time(problem.since + timedelta(seconds=start_grace_seconds))
        return seen(waiting_phase, problem.reason, f"{problem.message}; the job fails if this lasts until {until} "
                           f"(grace {int(start_grace_seconds)}s)")
    blocked = unschedulable(active)
    if blocked is not None:
        return seen(waiting_phase, blocked.reason, blocked.message)
    running = [p for p in active if (p.get("status") or {}).get("phase") == "Running"]
    if running and len(running) == len(active):
        return seen(RUNNING, "PodsRunning", f"{len(running)} trainer pod(s) running", running_pods=len(running))
    fetching = [p for p in active if is_fetching(p)]
    if fetching and len(running) + len(fetching) == len(active):  # the pods hold their GPUs already
        return seen(RUNNING, FETCHING, f"{len(fetching)} pod(s) fetching the model and data into the cache "
                           "(status.progress has the bytes)", running_pods=len(active))
    if not active and pods:  # every pod ended; the Job controller has not decided yet
        finished = [p for p in pods if (p.get("status") or {}).get("phase") == "Succeeded"]
        ended = failed_pods(pods)
        if finished and not any(not is_ignored_failure(p) and _newer(p, finished) for p in ended):
            return seen(RUNNING, "PodsCompleted", "the trainer pods finished; the Job is completing")
        if previous.get("phase") in (RUNNING, RESTARTING) and ended:
            cause = pod_failure(ended[-1])
            text = cause.message if cause else "a trainer pod failed"
            return seen(previous["phase"], "PodFailed", f"{text}; the Job is deciding whether to retry")
    terminating = [p for p in pods if not is_active(p) and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]
    if terminating:  # deleted, evicted or preempted while running; the Job controller replaces it
        name = terminating[0].get("metadata", {}).get("name", "?")
        return seen(RESTARTING, "PodTerminating", f"pod {name} is being deleted; the Job replaces it")
    if restarts:
        failures = [c for c in map(pod_failure, failed_pods(pods)) if c is not None]
        last = f": {failures[-1].message}" if failures else ""
        return seen(RESTARTING, "Restarting", f"replacing a trainer pod (restart {restarts}){last}")
    return seen(PENDING, "PodsStarting", "waiting for the trainer pods to start")


def owned(status: dict[str, Any] | None) -> dict[str, Any]:
    """The cluster-derived part of a status (without what the trainer reported)."""
    return {k: v for k, v in (status or {}).items() if k in OWNED_FIELDS and v is not None}


def derive_status(
    sftjob: dict[str, Any],
    job: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    now: datetime,
    *,
    start_grace_seconds: float = 300,
    effective_batch_size: int | None = None,
    creation_error: Cause | None = None,
    pod_creation_error: Cause | None = None,
    pod_problems: Mapping[str, Cause] | None = None,
    start_clocks: Mapping[tuple[str, str], datetime] | None = None,
    replaced_pods: Collection[str] = (),
    queue_workload: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The cluster-derived status fields (``OWNED_FIELDS``) of an SFTJob, given its Job and that Job's pods
    (``replaced_pods``: uids of its pods that failed as disruptions or exit 75 and are gone)."""
    meta = sftjob.get("metadata") or {}
    generation = meta.get("generation")
    previous = owned(sftjob.get("status"))
    name = meta.get("name")

    if previous.get("phase") in TERMINAL_PHASES:  # terminal phases stick
        latched = dict(previous)
        if generation is not None:
            latched["observedGeneration"] = generation
            latched["conditions"] = [{**c, "observedGeneration": generation} for c in previous.get("conditions") or []]
        return latched

    obs = observe(
        sftjob,
        job,
        pods,
        now,
        start_grace_seconds=start_grace_seconds,
        creation_error=creation_error,
        pod_creation_error=pod_creation_error if job is not None and not [p for p in pods if is_active(p)] else None,
        pod_problems=pod_problems,
        start_clocks=start_clocks,
        replaced_pods=replaced_pods,
        queue_workload=queue_workload,
    )
    status: dict[str, Any] = {
        "phase": obs.phase,
        "reason": obs.reason,
        "conditions": merge_conditions(previous.get("conditions"), conditions_for(obs), now, generation),
        "restarts": obs.restarts,
    }
    if generation is not None:
        status["observedGeneration"] = generation
    if job is not None:
        status["jobName"] = (job.get("metadata") or {}).get("name", name)
    elif previous.get("jobName"):
        status["jobName"] = previous["jobName"]
    applied = applied_defaults_of(job)
    if applied is None and previous.get("appliedDefaults"):
        applied = previous["appliedDefaults"]
    if applied:
        status["appliedDefaults"] = applied
    if previous.get("effectiveBatchSize") is not None:  # the trainer's own report wins over the spec's
        status["effectiveBatchSize"] = previous["effectiveBatchSize"]
    elif effective_batch_size is not None:
        status["effectiveBatchSize"] = effective_batch_size

    start = previous.get("startTime") or trainer_start_time(pods)
    if start is None and obs.phase in (RUNNING, SUCCEEDED):
        start = format_time(now)
    if start:
        status["startTime"] = start
    if obs.phase in TERMINAL_PHASES:
        job_status = (job or {}).get("status") or {}
        failed_cond = job_condition(job, "Failed") or {}
        status["completionTime"] = (
            job_status.get("completionTime") or failed_cond.get("lastTransitionTime") or format_time(now)
        )
    return status


def applied_defaults_of(job: dict[str, Any] | None) -> dict[str, Any] | None:
    """The platform defaults the Job was rendered with (its annotation), or None when unknown."""
    text = (((job or {}).get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_APPLIED_DEFAULTS)
    if not text:
        return None
    try:  # checked, so an edited annotation can never make the status write fail its schema
        applied = PlatformDefaults.model_validate_json(text)
    except ValidationError:
        return None
    return applied.model_dump(mode="json", by_alias=True, exclude_none=True)


def _held_from(since: datetime | None, seconds: float) -> datetime | None:
    return since + timedelta(seconds=seconds) if since else None


def settle_until(
    current: dict[str, Any],
    desired: dict[str, Any],
    sftjob: dict[str, Any],
    job: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    *,
    queue_seconds: float,
    starting_seconds: float,
) -> datetime | None:
    """Until when a change may wait unwritten (None: write it now).

    Every healthy job passes through states that last a moment: its children being created, its
    pods being created and starting, its pods finished while the Job controller has not yet said
    Complete, or the Job Complete while rank 0's last update (with the result) is still on its way.
    The next state usually follows, so such a state is written only if it lasts; in a
    burst of new SFTJobs that saves a write or two per job. Waiting on a controller's queue (the
    operator's for the children, the Job controller's for the pods and for Complete) is held for
    ``queue_seconds``, since in a burst those queues are long; a pod starting (scheduling, a
    cached image, the container's start) for ``starting_seconds``. Anything a person needs to see
    (a problem, such as a FailedCreate read from the Job's events, Running, the end) is written at
    once.
    """
    first = not current.get("phase")
    quiet = first or (current.get("phase") == PENDING and current.get("reason") in ("Creating", "PodsStarting"))
    if first and desired.get("phase") == PENDING and desired.get("reason") == "Creating":
        return _held_from(parse_time((sftjob.get("metadata") or {}).get("creationTimestamp")), queue_seconds)
    if quiet and desired.get("phase") == PENDING and desired.get("reason") == "PodsStarting":
        if not pods:  # the Job controller has not created them yet
            return _held_from(parse_time(((job or {}).get("metadata") or {}).get("creationTimestamp")), queue_seconds)
        created = [parse_time((p.get("metadata") or {}).get("creationTimestamp")) for p in pods]
        return _held_from(max((c for c in created if c), default=None), starting_seconds)
    if current.get("phase") == desired.get("phase") == RUNNING and desired.get("reason") == "PodsCompleted":
        finished = [parse_time(finished_at(p)) for p in pods if (p.get("status") or {}).get("phase") == "Succeeded"]
        return _held_from(max((f for f in finished if f), default=None), queue_seconds)
    if desired.get("phase") == SUCCEEDED and current.get("phase") != SUCCEEDED and not result_pods(pods):
        # The Job says Complete before the pods' watch brought rank 0's last update, which has the result:
        # Succeeded waits for it (a kubectl wait that returns finds status.output), as long as the queue.
        job_status = (job or {}).get("status") or {}
        done = job_status.get("completionTime") or (job_condition(job, "Complete") or {}).get("lastTransitionTime")
        return _held_from(parse_time(done), queue_seconds)
    return None
