"""An SFTJob's status, derived from its Job and pods, and what follows a change (pure functions, no I/O).

``derive_status`` says what the cluster-derived part of ``status`` should be (``OWNED_FIELDS``);
``with_progress`` and ``with_result`` add what the trainer reported (``status.progress``,
``status.metrics``, ``status.output``), built from the API models; ``transition`` says which
Events, metric records and Job stops follow a change from one status to the next. The status
writer (``sft_operator.runtime.writer``) feeds them the cache and applies what they return.

Phases are a convenience for people; automation reads the conditions. Terminal phases stick:
once an SFTJob is Succeeded or Failed, later observations (its Job deleted, pods garbage
collected) never move it back.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from pydantic import ValidationError

from sft_contract.exit_codes import NON_RETRIABLE, REASONS, UNCOUNTED, ExitCode
from sft_contract.messages import EvaluationResult, ProgressReport, TrainerResult
from sft_operator.api.types import (
    EVALUATION_PASSED, TERMINAL_PHASES, ConditionType, Metrics, OutputStatus, Phase, PlatformDefaults, Progress,
    Stage,
)
from sft_operator.core.render import ANNOTATION_APPLIED_DEFAULTS, FETCH_CONTAINER, TRAINER_CONTAINER

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

PENDING, QUEUED, RUNNING, RESTARTING, SUSPENDED, SUCCEEDED, FAILED = (p.value for p in Phase)
CONDITION_TYPES = tuple(c.value for c in ConditionType)
CREATED, QUEUED_C, SUSPENDED_C, RUNNING_C, RESTARTING_C, SUCCEEDED_C, FAILED_C = CONDITION_TYPES

IMAGE_PULL_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
# A container the kubelet cannot create (e.g. a secretKeyRef naming a missing key): it never starts.
CONTAINER_CONFIG_REASONS = frozenset({"CreateContainerConfigError", "CreateContainerError"})
# Pod events that keep a scheduled pod in ContainerCreating: a volume that cannot be mounted or attached.
VOLUME_EVENT_REASONS = frozenset({"FailedMount", "FailedAttachVolume"})
# Pod events that come only once the volumes are attached or mounted: a volume problem before them is over.
VOLUME_DONE_REASONS = frozenset({"SuccessfulAttachVolume", "SuccessfulMountVolume", "Pulling", "Pulled", "Created",
                                 "Started"})
# The kinds of start problem, each timed on its own per pod: an image that does not pull, a container the
# kubelet cannot create, a volume that cannot be attached or mounted.
IMAGE, CONFIG, VOLUME = "image", "config", "volume"
OOM_KILLED = "OOMKilled"
IMAGE_PULL_FAILED = "ImagePullFailed"
UNSCHEDULABLE = "Unschedulable"
DEADLINE_EXCEEDED = "DeadlineExceeded"
BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
NAME_CONFLICT = "NameConflict"
INVALID_SPEC = "InvalidSpec"
MULTI_ATTACH = "MultiAttach"
READ_WRITE_ONCE_CLAIM = "ReadWriteOnceClaim"  # nodes > 1 would write a claim only one node can mount
FETCHING = "Fetching"  # the fetch stage (init container) fills the cache
COMPLETED_WITH_WARNING = "CompletedWithWarning"  # the Event for a result's warning
# Child-creation causes that no retry can fix: the job fails with them.
FINAL_CREATION_REASONS = frozenset({NAME_CONFLICT, INVALID_SPEC, READ_WRITE_ONCE_CLAIM})
MAX_MESSAGE = 2048  # keep status small; the full text is in the pod
POD_EVENTS_AFTER_SECONDS = 10.0  # a scheduled pod not started this long: read its events (FailedMount, ...)
JOB_EVENTS_AFTER_SECONDS = 10.0  # a Job without pods this long: read its FailedCreate events
LOOKUP_AGAIN_SECONDS = 30.0


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


def fetch_status(pod: dict[str, Any]) -> dict[str, Any] | None:
    """The fetch stage's init container status, if the pod has one."""
    for status in (pod.get("status") or {}).get("initContainerStatuses") or []:
        if status.get("name") == FETCH_CONTAINER:
            return status
    return None


def _terminated(status: dict[str, Any] | None) -> dict[str, Any] | None:
    status = status or {}
    return (status.get("state") or {}).get("terminated") or (status.get("lastState") or {}).get("terminated")


def ended_container(pod: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(container name, terminated state) of what ended the pod: an init container that failed (the trainer
    never ran), else the trainer."""
    for status in (pod.get("status") or {}).get("initContainerStatuses") or []:
        state = _terminated(status)
        if state and state.get("exitCode") not in (0, None):
            return status.get("name", "?"), state
    trainer = trainer_status(pod)
    state = _terminated(trainer)
    return ((trainer or {}).get("name", TRAINER_CONTAINER), state) if state else None


def terminated_state(pod: dict[str, Any]) -> dict[str, Any] | None:
    ended = ended_container(pod)
    return ended[1] if ended else None


def is_fetching(pod: dict[str, Any]) -> bool:
    """The fetch stage runs (the trainer waits for it)."""
    return bool(((fetch_status(pod) or {}).get("state") or {}).get("running"))


def past_init(pod: dict[str, Any]) -> bool:
    """An init container has started: the pod's volumes are mounted."""
    return any((s.get("state") or {}).get("running") or _terminated(s)
               for s in (pod.get("status") or {}).get("initContainerStatuses") or [])


def is_active(pod: dict[str, Any]) -> bool:
    phase = (pod.get("status") or {}).get("phase")
    return phase not in ("Succeeded", "Failed") and not pod.get("metadata", {}).get("deletionTimestamp")


def is_disrupted(pod: dict[str, Any]) -> bool:
    """Evicted, preempted or deleted by a controller: the Job ignores it (podFailurePolicy)."""
    cond = pod_condition(pod, "DisruptionTarget")
    return bool(cond and cond.get("status") == "True")


def is_interrupted(pod: dict[str, Any]) -> bool:
    """The trainer exited 75 (SIGTERM, checkpoint saved) or 76 (a peer rank was lost): the Job ignores it
    (podFailurePolicy). In a multi-node run every rank exits so when one pod is evicted, and only that pod
    is a disruption."""
    return (terminated_state(pod) or {}).get("exitCode") in UNCOUNTED


def is_ignored_failure(pod: dict[str, Any]) -> bool:
    """A failed pod that the podFailurePolicy does not count against backoffLimit."""
    return is_disrupted(pod) or is_interrupted(pod)


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
    since: datetime | None = None  # when it began, where that counts (a pod's volume problem)

    @property
    def final(self) -> bool:
        return self.reason in FINAL_CREATION_REASONS


def pod_failure(pod: dict[str, Any]) -> Cause | None:
    """Why a terminated trainer container failed: OOMKilled, a trainer exit code, or another code."""
    name = pod.get("metadata", {}).get("name", "?")
    ended = ended_container(pod)
    container, state = ended if ended else (TRAINER_CONTAINER, None)
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
            f"container {container} of pod {name} ran out of memory (OOMKilled, exit code {code}); "
            "raise resources.memory or lower hyperparameters.perDeviceBatchSize / maxSeqLength",
        )
    who = f"pod {name}" if container == TRAINER_CONTAINER else f"the {container} stage of pod {name}"
    if code in REASONS:
        return Cause(REASONS[code], _clip(f"{who} exited with code {code}: {text or REASONS[code]}"))
    if code == 0:
        return None
    return Cause("Error", _clip(f"{who} exited with code {code}" + (f": {text}" if text else "")))


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
class StartProblem:
    """Why a scheduled pod's trainer does not start, and for how long."""

    reason: str  # as the kubelet says it: ErrImagePull, CreateContainerConfigError, FailedMount, MultiAttach, ...
    failed_reason: str  # the reason once the grace period is over: ImagePullFailed, or the same
    message: str
    since: datetime  # when this problem of this pod began
    seconds: float  # how long it has lasted


def _scheduled_since(pod: dict[str, Any]) -> datetime | None:
    scheduled = pod_condition(pod, "PodScheduled") or {}
    return parse_time(scheduled.get("lastTransitionTime")) or parse_time(pod.get("metadata", {}).get("creationTimestamp"))


def volume_cause(reason: str, message: str, since: datetime | None = None) -> Cause:
    """A FailedMount / FailedAttachVolume pod event as a reason (Multi-Attach named as such)."""
    if reason == "FailedAttachVolume" and "Multi-Attach" in message:
        reason = MULTI_ATTACH
    return Cause(reason, _clip(message), since)


def _event_time(event: dict[str, Any], first: bool) -> datetime | None:
    """When an event was first or last seen. A repeated event is one object: core/v1 keeps firstTimestamp and
    lastTimestamp (the kubelet's events), events.k8s.io eventTime and series.lastObservedTime."""
    firsts = [event.get("firstTimestamp"), event.get("eventTime")]
    lasts = [(event.get("series") or {}).get("lastObservedTime"), event.get("lastTimestamp")]
    return next((parse_time(t) for t in (firsts + lasts if first else lasts + firsts[::-1]) if t), None)


def volume_problem(events: list[dict[str, Any]]) -> Cause | None:
    """A pod's volume problem, read from its events: the newest FailedMount or FailedAttachVolume warning,
    since the first of them (the API server keeps when a repeated event began, so an operator restart loses
    nothing). None when there is none, or when a later event shows the pod moved on: attached, mounted,
    pulling its image, started."""
    never = datetime.min.replace(tzinfo=timezone.utc)
    done = max((_event_time(e, False) or never for e in events if e.get("reason") in VOLUME_DONE_REASONS), default=never)
    volume = [e for e in events if e.get("reason") in VOLUME_EVENT_REASONS and e.get("type") == "Warning"
              and (_event_time(e, False) or never) > done]
    if not volume:
        return None
    newest = max(volume, key=lambda e: _event_time(e, False) or never)
    began = min(_event_time(e, True) or never for e in volume)
    since = max(began, done) if began > never else None  # a problem after progress began after it
    return volume_cause(newest["reason"], newest.get("message", ""), since)


def _starting(pod: dict[str, Any]) -> bool:
    """Active and not running yet: what a start problem can hold up."""
    return is_active(pod) and (pod.get("status") or {}).get("phase") != "Running"


def container_problems(pod: dict[str, Any]) -> dict[str, Cause]:
    """The start problems a pod's container states show now, by kind (IMAGE, CONFIG); init containers first."""
    out: dict[str, Cause] = {}
    pod_status = pod.get("status") or {}
    for status in (pod_status.get("initContainerStatuses") or []) + (pod_status.get("containerStatuses") or []):
        waiting = (status.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        if reason in IMAGE_PULL_REASONS:
            out.setdefault(IMAGE, Cause(reason, _clip(f"image {status.get('image', '')}: {waiting.get('message') or reason}")))
        elif reason in CONTAINER_CONFIG_REASONS:
            name = pod.get("metadata", {}).get("name", "?")
            out.setdefault(CONFIG, Cause(reason, _clip(f"pod {name}: {waiting.get('message') or reason}")))
    return out


def track_start_clocks(pods: list[dict[str, Any]], clocks: Mapping[tuple[str, str], datetime],
                       now: datetime) -> dict[tuple[str, str], datetime]:
    """When each start problem that a container state shows began, by (pod uid, kind). The API keeps no time
    for a waiting state, so it is when the operator first saw it (``now`` then); it keeps its time while the
    problem lasts (the kubelet shows ErrImagePull or ImagePullBackOff all through a retried pull) and is
    dropped once the pod moved on (pulled, created, running), so the next problem starts a new clock."""
    out: dict[tuple[str, str], datetime] = {}
    for pod in pods:
        if _starting(pod):
            uid = pod.get("metadata", {}).get("uid", "")
            for kind in container_problems(pod):
                out[(uid, kind)] = clocks.get((uid, kind), now)
    return out


def start_problem(
    pods: list[dict[str, Any]], now: datetime, pod_problems: Mapping[str, Cause] | None = None,
    clocks: Mapping[tuple[str, str], datetime] | None = None,
) -> StartProblem | None:
    """The longest-lasting reason an active pod cannot start its trainer: an image that does not pull or a
    container the kubelet cannot create (timed by ``clocks``, from ``track_start_clocks``), or a volume it
    cannot attach or mount (``pod_problems``, by pod uid, from ``volume_problem``). A volume problem no
    longer counts once the pod is past it: an init container started, or a container state shows a later
    problem. A problem without a known start counts from ``now``."""
    worst: StartProblem | None = None
    for pod in pods:
        if not _starting(pod):
            continue
        uid = pod.get("metadata", {}).get("uid", "")
        found = {kind: (cause, (clocks or {}).get((uid, kind)) or now) for kind, cause in container_problems(pod).items()}
        volume = (pod_problems or {}).get(uid)
        if volume is not None and not found and not past_init(pod):
            found[VOLUME] = (volume, volume.since or now)
        for kind, (cause, since) in found.items():
            problem = StartProblem(cause.reason, IMAGE_PULL_FAILED if kind == IMAGE else cause.reason, cause.message,
                                   since, max(0.0, (now - since).total_seconds()))
            if worst is None or problem.seconds > worst.seconds:
                worst = problem
    return worst


def _newer(pod: dict[str, Any], others: list[dict[str, Any]]) -> bool:
    """Whether ``pod`` ended after all of ``others``."""
    return all(_finished_at(pod) > _finished_at(o) for o in others)


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int) else 0


def count_restarts(job: dict[str, Any] | None, pods: list[dict[str, Any]], previous: int = 0,
                   replaced: Collection[str] = ()) -> int:
    """Pods the Job controller had to replace: failures it counted plus those it ignored (disruptions, exit 75).

    ``replaced``: uids of ignored failures the watch reported, gone from the cluster or not (a deleted pod
    can vanish before any status write saw it failed); each pod counts once. Never goes down: replaced pods disappear, the count must not.
    At the end a failed Job's last failure is not a restart (nothing replaced that pod).
    """
    status = (job or {}).get("status") or {}
    failed = _int(status.get("failed"))
    gone = set(replaced)
    here = [p for p in failed_pods(pods) if is_ignored_failure(p) and p["metadata"].get("uid") not in gone]
    disrupted = len(here) + len(gone)
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


def queue_state(workload: Mapping[str, Any] | None) -> tuple[str, str]:
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
    return reason, "; ".join(parts)


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
    restarts = count_restarts(job, pods, _int(previous.get("restarts")), replaced_pods)
    if creation_error is not None and creation_error.final:
        return Observation(FAILED, creation_error.reason, creation_error.message, restarts, creation_error)
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
        reason, said = queue_state(queue_workload)
        if said:
            return Observation(QUEUED, reason, f"{where} (Kueue): {said}", restarts)
        return Observation(QUEUED, reason, f"the trainer Job is suspended until {where} admits it", restarts)

    active = [p for p in pods if is_active(p)]
    waiting_phase = RESTARTING if restarts else PENDING
    if not active and pod_creation_error is not None:
        # The Job exists but cannot create its pods (a GPU ResourceQuota, admission): say why.
        return Observation(waiting_phase, pod_creation_error.reason, pod_creation_error.message, restarts)
    problem = start_problem(active, now, pod_problems, start_clocks)
    if problem is not None:
        if problem.seconds >= start_grace_seconds:
            return Observation(
                FAILED,
                problem.failed_reason,
                f"{problem.message} (failing for {int(problem.seconds)}s, grace {int(start_grace_seconds)}s)",
                restarts,
            )
        # A time, not the seconds left: the message (and so the status) stays the same while the problem lasts.
        until = format_time(problem.since + timedelta(seconds=start_grace_seconds))
        return Observation(waiting_phase, problem.reason, f"{problem.message}; the job fails if this lasts until {until} "
                           f"(grace {int(start_grace_seconds)}s)", restarts)
    blocked = unschedulable(active)
    if blocked is not None:
        return Observation(waiting_phase, blocked.reason, blocked.message, restarts)
    running = [p for p in active if (p.get("status") or {}).get("phase") == "Running"]
    if running and len(running) == len(active):
        return Observation(RUNNING, "PodsRunning", f"{len(running)} trainer pod(s) running", restarts, running_pods=len(running))
    fetching = [p for p in active if is_fetching(p)]
    if fetching and len(running) + len(fetching) == len(active):  # the pods hold their GPUs already
        return Observation(RUNNING, FETCHING, f"{len(fetching)} pod(s) fetching the model and data into the cache "
                           "(status.progress has the bytes)", restarts, running_pods=len(active))
    if not active and pods:  # every pod ended; the Job controller has not decided yet
        finished = [p for p in pods if (p.get("status") or {}).get("phase") == "Succeeded"]
        ended = failed_pods(pods)
        if finished and not any(not is_ignored_failure(p) and _newer(p, finished) for p in ended):
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


def recheck_seconds(pods: list[dict[str, Any]], now: datetime, grace_seconds: float,
                    pod_problems: Mapping[str, Cause] | None = None,
                    clocks: Mapping[tuple[str, str], datetime] | None = None) -> float | None:
    """When a pod that cannot start runs out of its grace period: derive again then."""
    problem = start_problem([p for p in pods if is_active(p)], now, pod_problems, clocks)
    return None if problem is None else max(0.0, grace_seconds - problem.seconds)


@dataclass(frozen=True)
class Lookup:
    """An object whose events would explain a stuck job, and in how many seconds to read them."""

    kind: str  # "Job" (FailedCreate: no pods) or "Pod" (FailedMount, FailedAttachVolume)
    name: str
    uid: str
    after_seconds: float


def lookups(job: dict[str, Any] | None, pods: list[dict[str, Any]], now: datetime) -> list[Lookup]:
    """Events worth reading: a running Job without pods, a scheduled pod whose trainer has not started."""
    if job is None or (job.get("spec") or {}).get("suspend") or job_condition(job, "Complete") or job_condition(job, "Failed"):
        return []
    meta = job.get("metadata") or {}
    out: list[Lookup] = []
    active = [p for p in pods if is_active(p)]
    if not active:
        created = parse_time(meta.get("creationTimestamp"))
        age = (now - created).total_seconds() if created else JOB_EVENTS_AFTER_SECONDS
        out.append(Lookup("Job", meta.get("name", ""), meta.get("uid", ""), max(0.0, JOB_EVENTS_AFTER_SECONDS - age)))
    for pod in active:
        scheduled = pod_condition(pod, "PodScheduled") or {}
        if (pod.get("status") or {}).get("phase") != "Pending" or scheduled.get("status") != "True" or past_init(pod):
            continue
        since = _scheduled_since(pod)
        age = (now - since).total_seconds() if since else 0.0
        pmeta = pod.get("metadata") or {}
        out.append(Lookup("Pod", pmeta.get("name", ""), pmeta.get("uid", ""), max(0.0, POD_EVENTS_AFTER_SECONDS - age)))
    return out


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
        finished = [parse_time(_finished_at(p)) for p in pods if (p.get("status") or {}).get("phase") == "Succeeded"]
        return _held_from(max((f for f in finished if f), default=None), queue_seconds)
    if desired.get("phase") == SUCCEEDED and current.get("phase") != SUCCEEDED and not result_pods(pods):
        # The Job says Complete before the pods' watch brought rank 0's last update, which has the result:
        # Succeeded waits for it (a kubectl wait that returns finds status.output), as long as the queue.
        job_status = (job or {}).get("status") or {}
        done = job_status.get("completionTime") or (job_condition(job, "Complete") or {}).get("lastTransitionTime")
        return _held_from(parse_time(done), queue_seconds)
    return None


# ---- what the trainer reported -----------------------------------------------------------------


def _dump(model: Any) -> dict[str, Any]:
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


STAGES = {"fetching": Stage.fetching, "training": Stage.training, "exporting": Stage.exporting}


def with_progress(status: dict[str, Any], report: ProgressReport) -> dict[str, Any]:
    """``status`` with a progress report applied: progress replaced, the report's metrics and output
    over the earlier ones (an eval loss from an earlier report is kept). The ETA is cleared rather
    than left stale, and 0 once the run is complete."""
    eta = report.eta_seconds
    if eta is None and report.total_steps > 0 and report.step >= report.total_steps:
        eta = 0
    progress = Progress(percent=report.percent, step=report.step, total_steps=report.total_steps,
                        epoch=report.epoch, eta_seconds=eta, stage=STAGES[report.stage or "training"],
                        bytes_done=report.bytes_done, bytes_total=report.bytes_total)
    metrics = Metrics.model_validate(report.run_metrics())
    output = OutputStatus(model=report.output_model or None, best_checkpoint=report.best_checkpoint or None)
    out = {**status, "progress": _dump(progress)}
    if _dump(metrics):
        out["metrics"] = {**(status.get("metrics") or {}), **_dump(metrics)}
    if _dump(output):
        out["output"] = {**(status.get("output") or {}), **_dump(output)}
    if report.evaluation is not None:
        out = with_evaluation(out, report.evaluation)
    if report.effective_batch_size is not None:
        out["effectiveBatchSize"] = report.effective_batch_size
    return with_data(out, report)


def with_data(status: dict[str, Any], report: ProgressReport) -> dict[str, Any]:
    """``status`` with the fetch stage's data check (``status.data``), if the report carries one. Applied even
    once the job has failed: a check that failed the job says why in numbers too."""
    return {**status, "data": _dump(report.data)} if report.data is not None else status


def with_result(status: dict[str, Any], result: TrainerResult) -> dict[str, Any]:
    """``status`` with a finished run's result (its termination message): output, final metrics, 100 %."""
    output = OutputStatus(model=result.output_model, uri=result.output_uri, best_checkpoint=result.best_checkpoint,
                          mlflow_run_id=result.mlflow_run_id)
    metrics = Metrics.model_validate(result.run_metrics())
    progress = {**(status.get("progress") or {}), "percent": 100, "etaSeconds": 0}  # what the result says wins
    for done in ("stage", "bytesDone", "bytesTotal"):  # the run is over: no stage any more
        progress.pop(done, None)
    said = {"step": result.steps, "totalSteps": result.total_steps or result.steps, "epoch": result.epochs}
    progress.update({k: v for k, v in said.items() if v is not None})
    out = {
        **status,
        "progress": _dump(Progress.model_validate(progress)),
        "metrics": {**(status.get("metrics") or {}), **_dump(metrics)},
        "output": {**(status.get("output") or {}), **_dump(output)},
    }
    if result.evaluation is not None:
        out = with_evaluation(out, result.evaluation)
    if result.warning:  # e.g. the tracking server was down: the run succeeded, a person should know
        said = f"; warning: {result.warning}"  # once: applying the same result again changes nothing
        out["conditions"] = [{**c, "message": _clip(f"{c.get('message') or 'training finished'}{said}")}
                             if c.get("type") == SUCCEEDED_C and c.get("status") == "True"
                             and said not in (c.get("message") or "") else c
                             for c in status.get("conditions") or []]
    return out


def with_evaluation(status: dict[str, Any], evaluation: EvaluationResult) -> dict[str, Any]:
    """``status`` with the gates the trainer reported; a judged evaluation is never replaced by a baseline."""
    known = status.get("evaluation") or {}
    if known.get("passed") is not None and evaluation.passed is None:
        return status
    return {**status, "evaluation": _dump(evaluation)}


def _number(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def evaluation_condition(status: dict[str, Any]) -> dict[str, Any] | None:
    """EvaluationPassed, from status.evaluation and the job's end; None for a job without gates (pure)."""
    if status.get("phase") == FAILED and status.get("reason") == REASONS[ExitCode.EVALUATION_FAILED]:
        failed = condition(status, FAILED_C) or {}
        return _condition(EVALUATION_PASSED, False, REASONS[ExitCode.EVALUATION_FAILED],
                          _clip(failed.get("message") or "an evaluation gate failed"))
    evaluation = status.get("evaluation")
    if not evaluation or not evaluation.get("gates"):
        return None
    gates = evaluation["gates"]
    if evaluation.get("passed") is None:
        return {"type": EVALUATION_PASSED, "status": "Unknown", "reason": "Measuring",
                "message": "the base model is measured; the tuned model is judged when training ends"}
    summary = "; ".join(f"{g['metric']}: base {_number(g.get('base'))}, tuned {_number(g.get('tuned'))}"
                        + ("" if g.get("passed") else f" ({g.get('message', 'failed')})") for g in gates)
    if evaluation["passed"]:
        return _condition(EVALUATION_PASSED, True, "GatesPassed", _clip(f"all {len(gates)} gate(s) passed: {summary}"))
    rejected = any(g.get("passed") is False and g.get("onFail") == "Fail" for g in gates)
    reason = REASONS[ExitCode.EVALUATION_FAILED] if rejected else "GatesFailed"
    failed = [g for g in gates if g.get("passed") is False]
    return _condition(EVALUATION_PASSED, False, reason,
                      _clip(f"{len(failed)} of {len(gates)} gate(s) failed: {summary}"))


def with_evaluation_condition(status: dict[str, Any], previous: dict[str, Any] | None, now: datetime) -> dict[str, Any]:
    """``status`` with its EvaluationPassed condition (after the others), stamped as merge_conditions does:
    ``previous`` (the status as written) keeps its lastTransitionTime while the condition's status holds."""
    fresh = evaluation_condition(status)
    others = [c for c in status.get("conditions") or [] if c.get("type") != EVALUATION_PASSED]
    if fresh is None:
        return {**status, "conditions": others} if len(others) != len(status.get("conditions") or []) else status
    old = condition(previous, EVALUATION_PASSED)
    kept = old.get("lastTransitionTime") if old and old.get("status") == fresh["status"] else None
    fresh["lastTransitionTime"] = kept or format_time(now)
    if status.get("observedGeneration") is not None:
        fresh["observedGeneration"] = status["observedGeneration"]
    return {**status, "conditions": [*others, fresh]}


def completion_index(pod: dict[str, Any]) -> str | None:
    meta = pod.get("metadata") or {}
    key = "batch.kubernetes.io/job-completion-index"
    return (meta.get("labels") or {}).get(key) or (meta.get("annotations") or {}).get(key)


def result_pods(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rank 0's pods that succeeded: the last update of one of them carries the result (or never will)."""
    return [p for p in pods if (p.get("status") or {}).get("phase") == "Succeeded" and completion_index(p) in ("0", None)]


def result_from_pods(pods: list[dict[str, Any]]) -> TrainerResult | None:
    """The result rank 0 left in its termination message when it succeeded (the newest such pod)."""
    for pod in sorted(result_pods(pods), key=_finished_at, reverse=True):
        state = terminated_state(pod) or {}
        message = (state.get("message") or "").strip()
        if state.get("exitCode") != 0 or not message.startswith("{"):
            continue
        try:
            return TrainerResult.model_validate(json.loads(message))
        except (ValueError, ValidationError):
            continue
    return None


# ---- what follows a change --------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event for a person to act on."""

    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Effects:
    """What follows one status change; the writer applies it."""

    events: tuple[Event, ...] = ()
    log: str | None = None  # one line for the operator log
    started: bool = False  # first Running: record the time to running
    finished: tuple[str, str, float | None] | None = None  # (result, reason, seconds)
    evaluation_passed: bool | None = None  # the gates were just judged: whether every one passed


# Creation causes a person acts on (a quota, RBAC, a name taken); not the normal "Creating".
_CREATION_WARNINGS = frozenset({"QuotaExceeded", "Forbidden", "NotFound", "CreateFailed", "AwaitingGarbageCollection"})


def transition(before: dict[str, Any], after: dict[str, Any], result_warning: str | None = None) -> Effects:
    """The Events and metric records that follow a status change (pure).

    Events are only for what a person acts on: a failure, a pod replaced, children that cannot be
    created, a run that succeeded with a warning in its result (``result_warning``, given only by the
    write that brings the result into status: e.g. its tracking server was down). Progress is in status and `kubectl wait`; no Event says "created" or "started".
    """
    old_phase, phase = before.get("phase"), after.get("phase")
    events: list[Event] = []
    log = f"{old_phase or '-'} -> {phase} ({after.get('reason', '')})" if phase != old_phase else None
    restarts, old_restarts = _int(after.get("restarts")), _int(before.get("restarts"))
    if restarts > old_restarts:
        cond = condition(after, RESTARTING_C) or {}
        events.append(Event("Warning", "Restarted", f"trainer pod replaced (restart {restarts})"
                            + (f": {cond['message']}" if cond.get("message") else "")))
    created, old_created = condition(after, CREATED) or {}, condition(before, CREATED) or {}
    if created.get("reason") in _CREATION_WARNINGS and (created.get("reason"), created.get("message")) != (
        old_created.get("reason"), old_created.get("message")
    ):
        events.append(Event("Warning", created["reason"], created.get("message", "")))
    started = phase == RUNNING and old_phase != RUNNING and not before.get("startTime")
    finished = None
    if phase in TERMINAL_PHASES and old_phase not in TERMINAL_PHASES:
        cond = condition(after, phase) or {}
        reason = cond.get("reason", phase)
        finished = (phase, reason, duration_seconds(after))
        if phase == FAILED:
            events.append(Event("Warning", "Failed", f"{reason}: {cond.get('message', '')}"))
    if phase == SUCCEEDED and result_warning:  # with Succeeded, or later if rank 0's pod showed its result later
        events.append(Event("Warning", COMPLETED_WITH_WARNING, result_warning))
    judged = None
    gate, old_gate = condition(after, EVALUATION_PASSED) or {}, condition(before, EVALUATION_PASSED) or {}
    if gate.get("status") in ("True", "False") and (gate.get("status"), gate.get("reason")) != (
        old_gate.get("status"), old_gate.get("reason")
    ):
        judged = gate["status"] == "True"
        events.append(Event("Normal" if judged else "Warning", gate.get("reason", EVALUATION_PASSED),
                            gate.get("message", "")))
    return Effects(events=tuple(events), log=log, started=started, finished=finished, evaluation_passed=judged)


def condition(status: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    for cond in (status or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return cond
    return None


def duration_seconds(status: dict[str, Any]) -> float | None:
    start, end = parse_time(status.get("startTime")), parse_time(status.get("completionTime"))
    return (end - start).total_seconds() if start and end else None
