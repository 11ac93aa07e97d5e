"""An SFTJob's status, derived from its Job and pods (pure functions, no I/O).

The handlers feed in what the watches saw; these functions say what `status` should be.
The operator owns the fields in ``OWNED_FIELDS``; ``status.progress``, ``status.metrics`` and
``status.output`` belong to the progress endpoint and are never touched here.

Phases are a convenience for people; automation reads the conditions. Terminal phases stick:
once an SFTJob is Succeeded or Failed, later observations (its Job deleted, pods garbage
collected) never move it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sft_trainer.exit_codes import NON_RETRIABLE, REASONS

from .render import TRAINER_CONTAINER

OWNED_FIELDS = (
    "observedGeneration",
    "phase",
    "conditions",
    "startTime",
    "completionTime",
    "restarts",
    "effectiveBatchSize",
    "jobName",
)
PROGRESS_FIELDS = ("progress", "metrics", "output")  # written by the progress endpoint
# Also reported by the trainer through the progress endpoint: we fill it in, never overwrite it.
SET_ONCE_FIELDS = ("effectiveBatchSize",)

PENDING, QUEUED, RUNNING, RESTARTING, SUSPENDED, SUCCEEDED, FAILED = (
    "Pending",
    "Queued",
    "Running",
    "Restarting",
    "Suspended",
    "Succeeded",
    "Failed",
)
TERMINAL_PHASES = frozenset({SUCCEEDED, FAILED})
PHASES = (PENDING, QUEUED, RUNNING, RESTARTING, SUSPENDED, SUCCEEDED, FAILED)

# Condition types, in the order they appear in status (adjectives or past tense).
CREATED, QUEUED_C, SUSPENDED_C, RUNNING_C, RESTARTING_C, SUCCEEDED_C, FAILED_C = (
    "Created",
    "Queued",
    "Suspended",
    "Running",
    "Restarting",
    "Succeeded",
    "Failed",
)
CONDITION_TYPES = (CREATED, QUEUED_C, SUSPENDED_C, RUNNING_C, RESTARTING_C, SUCCEEDED_C, FAILED_C)

IMAGE_PULL_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
OOM_KILLED = "OOMKilled"
IMAGE_PULL_FAILED = "ImagePullFailed"
UNSCHEDULABLE = "Unschedulable"
DEADLINE_EXCEEDED = "DeadlineExceeded"
BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
MAX_MESSAGE = 2048  # keep status small; the full text is in the pod


# ---- time ------------------------------------------------------------------------------------


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def format_time(value: datetime) -> str:
    return value.astimezone(timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- reading Jobs and pods ---------------------------------------------------------------------


def job_condition(job: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    """The Job's condition of that type when it is True."""
    for cond in ((job or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return cond
    return None


def pod_condition(pod: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return cond
    return None


def trainer_status(pod: dict[str, Any]) -> dict[str, Any] | None:
    """The trainer container's status (the first container's if none is named trainer)."""
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for status in statuses:
        if status.get("name") == TRAINER_CONTAINER:
            return status
    return statuses[0] if statuses else None


def terminated_state(pod: dict[str, Any]) -> dict[str, Any] | None:
    status = trainer_status(pod) or {}
    state = (status.get("state") or {}).get("terminated")
    return state or (status.get("lastState") or {}).get("terminated")


def is_active(pod: dict[str, Any]) -> bool:
    phase = (pod.get("status") or {}).get("phase")
    return phase not in ("Succeeded", "Failed") and not pod.get("metadata", {}).get("deletionTimestamp")


def is_disrupted(pod: dict[str, Any]) -> bool:
    """Evicted, preempted or deleted by a controller: the Job ignores it (podFailurePolicy)."""
    cond = pod_condition(pod, "DisruptionTarget")
    return bool(cond and cond.get("status") == "True")


def _finished_at(pod: dict[str, Any]) -> str:
    state = terminated_state(pod) or {}
    return state.get("finishedAt") or pod.get("metadata", {}).get("creationTimestamp") or ""


def failed_pods(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Failed pods, oldest failure first."""
    return sorted(
        (p for p in pods if (p.get("status") or {}).get("phase") == "Failed"),
        key=lambda p: (_finished_at(p), p.get("metadata", {}).get("name", "")),
    )


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


@dataclass(frozen=True)
class Cause:
    """Why something is (or is not) happening: a CamelCase reason and a message for people."""

    reason: str
    message: str


def pod_failure(pod: dict[str, Any]) -> Cause | None:
    """Why a terminated trainer container failed: OOMKilled, a trainer exit code, or another code."""
    name = pod.get("metadata", {}).get("name", "?")
    state = terminated_state(pod)
    if not state:
        if is_disrupted(pod):
            cond = pod_condition(pod, "DisruptionTarget") or {}
            return Cause(cond.get("reason") or "Disrupted", _clip(f"pod {name}: {cond.get('message', 'disrupted')}"))
        reason = (pod.get("status") or {}).get("reason")
        if reason:  # e.g. Evicted, with no container status
            return Cause(reason, _clip(f"pod {name}: {(pod.get('status') or {}).get('message', reason)}"))
        return None
    code = state.get("exitCode")
    text = (state.get("message") or "").strip()
    if state.get("reason") == OOM_KILLED:
        return Cause(
            OOM_KILLED,
            f"container {TRAINER_CONTAINER} of pod {name} ran out of memory (OOMKilled, exit code {code}); "
            "raise resources.memory or lower hyperparameters.perDeviceBatchSize / maxSeqLength",
        )
    if code in REASONS:
        return Cause(REASONS[code], _clip(f"pod {name} exited with code {code}: {text or REASONS[code]}"))
    if code == 0:
        return None
    return Cause("Error", _clip(f"pod {name} exited with code {code}" + (f": {text}" if text else "")))


def job_failure(job: dict[str, Any], pods: list[dict[str, Any]]) -> Cause | None:
    """Why the Job failed, refined with the pods: the trainer's reason beats the Job's generic one."""
    cond = job_condition(job, "Failed") or job_condition(job, "FailureTarget")
    if cond is None:
        return None
    reason = cond.get("reason") or "JobFailed"
    message = cond.get("message") or f"the trainer Job failed ({reason})"
    failures = [(p, pod_failure(p)) for p in failed_pods(pods)]
    failures = [(p, c) for p, c in failures if c is not None]
    if reason == DEADLINE_EXCEEDED:
        return Cause(DEADLINE_EXCEEDED, _clip(f"runPolicy.activeDeadlineSeconds passed: {message}"))
    if reason == "PodFailurePolicy":
        for pod, cause in reversed(failures):
            state = terminated_state(pod) or {}
            if state.get("exitCode") in NON_RETRIABLE:
                return cause
        return Cause("PodFailurePolicy", _clip(message))
    if failures:
        last = failures[-1][1]
        if reason == BACKOFF_LIMIT_EXCEEDED and last.reason in {OOM_KILLED, *REASONS.values()}:
            return Cause(last.reason, _clip(f"{last.message} ({message})"))
        return Cause(reason, _clip(f"{message}; last failure: {last.message}"))
    return Cause(reason, _clip(message))


def unschedulable(pods: list[dict[str, Any]]) -> Cause | None:
    """The scheduler's message for an active pod it cannot place."""
    for pod in pods:
        cond = pod_condition(pod, "PodScheduled")
        if is_active(pod) and cond and cond.get("status") == "False" and cond.get("reason") == UNSCHEDULABLE:
            return Cause(UNSCHEDULABLE, _clip(cond.get("message") or "the scheduler cannot place the pod"))
    return None


@dataclass(frozen=True)
class PullProblem:
    reason: str  # ErrImagePull, ImagePullBackOff, ...
    message: str
    seconds: float  # how long the pod has been waiting for its image


def image_pull_problem(pods: list[dict[str, Any]], now: datetime) -> PullProblem | None:
    """The longest-lasting image pull failure among active pods."""
    worst: PullProblem | None = None
    for pod in pods:
        if not is_active(pod):
            continue
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (status.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") not in IMAGE_PULL_REASONS:
                continue
            scheduled = pod_condition(pod, "PodScheduled") or {}
            since = parse_time(scheduled.get("lastTransitionTime")) or parse_time(
                pod.get("metadata", {}).get("creationTimestamp")
            )
            seconds = max(0.0, (now - since).total_seconds()) if since else 0.0
            image = status.get("image", "")
            message = _clip(f"image {image}: {waiting.get('message') or waiting['reason']}")
            if worst is None or seconds > worst.seconds:
                worst = PullProblem(waiting["reason"], message, seconds)
    return worst


def _newer(pod: dict[str, Any], others: list[dict[str, Any]]) -> bool:
    """Whether ``pod`` ended after all of ``others``."""
    return all(_finished_at(pod) > _finished_at(o) for o in others)


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int) else 0


def count_restarts(job: dict[str, Any] | None, pods: list[dict[str, Any]], previous: int = 0) -> int:
    """Pods the Job controller had to replace: failures it counted plus disruptions it ignored.

    Never goes down: replaced pods disappear from the cluster, the count must not.
    At the end a failed Job's last failure is not a restart (nothing replaced that pod).
    """
    status = (job or {}).get("status") or {}
    failed = _int(status.get("failed"))
    disrupted = sum(1 for p in failed_pods(pods) if is_disrupted(p))
    cond = job_condition(job, "Failed") or job_condition(job, "FailureTarget")
    if cond is None:
        now = failed + disrupted
    elif cond.get("reason") in (BACKOFF_LIMIT_EXCEEDED, "PodFailurePolicy"):
        now = max(0, failed - 1) + disrupted
    else:  # a deadline kills every running pod at once; those are not restarts
        now = 0
    return max(previous, now)


def trainer_start_time(pods: list[dict[str, Any]]) -> str | None:
    """When the first trainer container started running."""
    times = []
    for pod in pods:
        status = trainer_status(pod) or {}
        for source in (status.get("state") or {}, status.get("lastState") or {}):
            for key in ("running", "terminated"):
                started = (source.get(key) or {}).get("startedAt")
                if started:
                    times.append(parse_time(started))
    return format_time(min(times)) if times else None


def pod_creation_cause(message: str) -> Cause:
    """The Job controller's FailedCreate event message as a reason: quota, admission, other."""
    if "exceeded quota" in message:
        reason = "QuotaExceeded"
    elif "forbidden" in message:
        reason = "Forbidden"
    else:
        reason = "FailedCreate"
    return Cause(reason, _clip(f"the Job cannot create its pods: {message}"))


# ---- the observation --------------------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    """What the cluster says about one SFTJob, in one phase with its reason."""

    phase: str
    reason: str
    message: str
    restarts: int = 0
    created: Cause | None = None  # None: the children exist
    running_pods: int = 0


def observe(
    sftjob: dict[str, Any],
    job: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    now: datetime,
    *,
    image_pull_grace_seconds: float,
    creation_error: Cause | None = None,
    pod_creation_error: Cause | None = None,
) -> Observation:
    """Phase, reason and message from the Job and its pods (not terminal-latched; see derive_status)."""
    previous = sftjob.get("status") or {}
    restarts = count_restarts(job, pods, _int(previous.get("restarts")))
    if job is None:
        if creation_error is not None:
            return Observation(PENDING, creation_error.reason, creation_error.message, restarts, creation_error)
        return Observation(PENDING, "Creating", "creating the trainer Job", restarts, Cause("Creating", "creating children"))

    if job_condition(job, "Complete") or job_condition(job, "SuccessCriteriaMet"):
        return Observation(SUCCEEDED, "Completed", "training finished", restarts)
    failure = job_failure(job, pods)
    if failure is not None:
        return Observation(FAILED, failure.reason, failure.message, restarts)

    run_policy = (sftjob.get("spec") or {}).get("runPolicy") or {}
    if (job.get("spec") or {}).get("suspend"):
        if run_policy.get("suspend"):
            return Observation(SUSPENDED, "Suspended", "runPolicy.suspend is true; the trainer pods are removed", restarts)
        queue = ((job.get("metadata") or {}).get("labels") or {}).get("kueue.x-k8s.io/queue-name")
        where = f"queue {queue}" if queue else "its queue"
        return Observation(QUEUED, "Queued", f"the trainer Job is suspended until {where} admits it", restarts)

    active = [p for p in pods if is_active(p)]
    waiting_phase = RESTARTING if restarts else PENDING
    if not active and pod_creation_error is not None and not job_condition(job, "Complete"):
        # The Job exists but cannot create its pods (a GPU ResourceQuota, admission): say why.
        return Observation(waiting_phase, pod_creation_error.reason, pod_creation_error.message, restarts)
    pull = image_pull_problem(active, now)
    if pull is not None:
        if pull.seconds >= image_pull_grace_seconds:
            return Observation(
                FAILED,
                IMAGE_PULL_FAILED,
                f"{pull.message} (failing for {int(pull.seconds)}s, grace {int(image_pull_grace_seconds)}s)",
                restarts,
            )
        left = int(image_pull_grace_seconds - pull.seconds)
        return Observation(waiting_phase, pull.reason, f"{pull.message}; the job fails if it lasts {left}s more", restarts)
    blocked = unschedulable(active)
    if blocked is not None:
        return Observation(waiting_phase, blocked.reason, blocked.message, restarts)
    running = [p for p in active if (p.get("status") or {}).get("phase") == "Running"]
    if running and len(running) == len(active):
        return Observation(RUNNING, "PodsRunning", f"{len(running)} trainer pod(s) running", restarts, running_pods=len(running))
    if not active and pods:  # every pod ended; the Job controller has not decided yet
        finished = [p for p in pods if (p.get("status") or {}).get("phase") == "Succeeded"]
        ended = failed_pods(pods)
        if finished and not any(not is_disrupted(p) and _newer(p, finished) for p in ended):
            return Observation(RUNNING, "PodsCompleted", "the trainer pods finished; the Job is completing", restarts)
        if previous.get("phase") in (RUNNING, RESTARTING) and ended:
            cause = pod_failure(ended[-1])
            text = cause.message if cause else "a trainer pod failed"
            return Observation(previous["phase"], "PodFailed", f"{text}; the Job is deciding whether to retry", restarts)
    terminating = [p for p in pods if not is_active(p) and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]
    if terminating:  # deleted, evicted or preempted while running; the Job controller replaces it
        name = terminating[0].get("metadata", {}).get("name", "?")
        return Observation(RESTARTING, "PodTerminating", f"pod {name} is being deleted; the Job replaces it", restarts)
    if restarts:
        failures = [c for c in map(pod_failure, failed_pods(pods)) if c is not None]
        last = f": {failures[-1].message}" if failures else ""
        return Observation(RESTARTING, "Restarting", f"replacing a trainer pod (restart {restarts}){last}", restarts)
    return Observation(PENDING, "PodsStarting", "waiting for the trainer pods to start", restarts)


# ---- conditions -------------------------------------------------------------------------------


def _condition(kind: str, true: bool, reason: str, message: str) -> dict[str, Any]:
    return {"type": kind, "status": "True" if true else "False", "reason": reason, "message": message}


def conditions_for(obs: Observation) -> list[dict[str, Any]]:
    """One condition per type, in CONDITION_TYPES order (no times yet)."""
    phase = obs.phase
    out = []
    if obs.created is None:
        out.append(_condition(CREATED, True, "ChildrenCreated", "ConfigMap, Service and Job exist"))
    else:
        out.append(_condition(CREATED, False, obs.created.reason, obs.created.message))
    out.append(
        _condition(QUEUED_C, True, obs.reason, obs.message) if phase == QUEUED else _condition(QUEUED_C, False, "NotQueued", "")
    )
    out.append(
        _condition(SUSPENDED_C, True, obs.reason, obs.message)
        if phase == SUSPENDED
        else _condition(SUSPENDED_C, False, "NotSuspended", "")
    )
    out.append(
        _condition(RUNNING_C, True, obs.reason, obs.message)
        if phase == RUNNING
        else _condition(RUNNING_C, False, obs.reason, obs.message)
    )
    out.append(
        _condition(RESTARTING_C, True, obs.reason, obs.message)
        if phase == RESTARTING
        else _condition(RESTARTING_C, False, "NotRestarting", f"{obs.restarts} restart(s) so far" if obs.restarts else "")
    )
    out.append(
        _condition(SUCCEEDED_C, True, obs.reason, obs.message)
        if phase == SUCCEEDED
        else _condition(SUCCEEDED_C, False, obs.reason if phase == FAILED else phase, "")
    )
    out.append(
        _condition(FAILED_C, True, obs.reason, obs.message)
        if phase == FAILED
        else _condition(FAILED_C, False, "Completed" if phase == SUCCEEDED else phase, "")
    )
    return out


def merge_conditions(
    previous: list[dict[str, Any]] | None, fresh: list[dict[str, Any]], now: datetime, generation: int | None
) -> list[dict[str, Any]]:
    """Stamp times and generation; a condition whose status did not change keeps its lastTransitionTime."""
    before = {c.get("type"): c for c in previous or []}
    stamp = format_time(now)
    out = []
    for cond in fresh:
        old = before.get(cond["type"])
        kept = old.get("lastTransitionTime") if old and old.get("status") == cond["status"] else None
        merged = {**cond, "lastTransitionTime": kept or stamp}
        if generation is not None:
            merged["observedGeneration"] = generation
        out.append(merged)
    return out


# ---- the status -------------------------------------------------------------------------------


def owned(status: dict[str, Any] | None) -> dict[str, Any]:
    """The operator's part of a status (without the progress endpoint's fields)."""
    return {k: v for k, v in (status or {}).items() if k in OWNED_FIELDS and v is not None}


def derive_status(
    sftjob: dict[str, Any],
    job: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    now: datetime,
    *,
    image_pull_grace_seconds: float = 300,
    effective_batch_size: int | None = None,
    creation_error: Cause | None = None,
    pod_creation_error: Cause | None = None,
) -> dict[str, Any]:
    """The operator-owned status fields for an SFTJob, given its Job and that Job's pods."""
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
        image_pull_grace_seconds=image_pull_grace_seconds,
        creation_error=creation_error,
        pod_creation_error=pod_creation_error,
    )
    status: dict[str, Any] = {
        "phase": obs.phase,
        "conditions": merge_conditions(previous.get("conditions"), conditions_for(obs), now, generation),
        "restarts": obs.restarts,
    }
    if generation is not None:
        status["observedGeneration"] = generation
    if job is not None:
        status["jobName"] = (job.get("metadata") or {}).get("name", name)
    elif previous.get("jobName"):
        status["jobName"] = previous["jobName"]
    if effective_batch_size is not None:
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


def status_patch(current: dict[str, Any] | None, desired: dict[str, Any]) -> dict[str, Any] | None:
    """The merge patch that takes the operator's part of ``current`` to ``desired``; None if equal.

    Fields outside OWNED_FIELDS (progress, metrics, output) are never in the patch, and
    SET_ONCE_FIELDS only when absent.
    """
    have = owned(current)
    patch: dict[str, Any] = {}
    for key in OWNED_FIELDS:
        if key in SET_ONCE_FIELDS and have.get(key) is not None:
            continue
        if have.get(key) != desired.get(key):
            patch[key] = desired.get(key)  # None deletes the field (merge patch)
    return patch or None


def condition(status: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    for cond in (status or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return cond
    return None


def duration_seconds(status: dict[str, Any]) -> float | None:
    start, end = parse_time(status.get("startTime")), parse_time(status.get("completionTime"))
    return (end - start).total_seconds() if start and end else None
