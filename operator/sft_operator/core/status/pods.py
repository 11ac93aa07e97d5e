"""Reading a Job and its pods: container states, why a pod or the Job failed, restarts, when the trainer
started (pure)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, NamedTuple

from sft_contract.exit_codes import NON_RETRIABLE, REASONS, UNCOUNTED
from sft_operator.core.render import FETCH_CONTAINER, TRAINER_CONTAINER
from sft_operator.core.status.vocabulary import Cause, as_int, clip, format_time, parse_time

OOM_KILLED = "OOMKilled"
UNSCHEDULABLE = "Unschedulable"
DEADLINE_EXCEEDED = "DeadlineExceeded"
BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"


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


class EndedContainer(NamedTuple):
    name: str
    state: dict[str, Any]  # its terminated state


def ended_container(pod: dict[str, Any]) -> EndedContainer | None:
    """What ended the pod: an init container that failed (the trainer never ran), else the trainer."""
    for status in (pod.get("status") or {}).get("initContainerStatuses") or []:
        state = _terminated(status)
        if state and state.get("exitCode") not in (0, None):
            return EndedContainer(name=status.get("name", "?"), state=state)
    trainer = trainer_status(pod)
    state = _terminated(trainer)
    return EndedContainer(name=(trainer or {}).get("name", TRAINER_CONTAINER), state=state) if state else None


def terminated_state(pod: dict[str, Any]) -> dict[str, Any] | None:
    ended = ended_container(pod)
    return ended.state if ended else None


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


def finished_at(pod: dict[str, Any]) -> str:
    state = terminated_state(pod) or {}
    return state.get("finishedAt") or pod.get("metadata", {}).get("creationTimestamp") or ""


def failed_pods(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Failed pods, oldest failure first."""
    return sorted(
        (p for p in pods if (p.get("status") or {}).get("phase") == "Failed"),
        key=lambda p: (finished_at(p), p.get("metadata", {}).get("name", "")),
    )


def pod_failure(pod: dict[str, Any]) -> Cause | None:
    """Why a terminated trainer container failed: OOMKilled, a trainer exit code, or another code."""
    name = pod.get("metadata", {}).get("name", "?")
    ended = ended_container(pod)
    container, state = (ended.name, ended.state) if ended else (TRAINER_CONTAINER, None)
    if not state:
        if is_disrupted(pod):
            cond = pod_condition(pod, "DisruptionTarget") or {}
            return Cause(cond.get("reason") or "Disrupted", clip(f"pod {name}: {cond.get('message', 'disrupted')}"))
        reason = (pod.get("status") or {}).get("reason")
        if reason:  # e.g. Evicted, with no container status
            return Cause(reason, clip(f"pod {name}: {(pod.get('status') or {}).get('message', reason)}"))
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
        return Cause(REASONS[code], clip(f"{who} exited with code {code}: {text or REASONS[code]}"))
    if code == 0:
        return None
    return Cause("Error", clip(f"{who} exited with code {code}" + (f": {text}" if text else "")))


class _PodFailure(NamedTuple):
    pod: dict[str, Any]
    cause: Cause


def job_failure(job: dict[str, Any], pods: list[dict[str, Any]]) -> Cause | None:
    """Why the Job failed, refined with the pods: the trainer's reason beats the Job's generic one."""
    cond = job_condition(job, "Failed") or job_condition(job, "FailureTarget")
    if cond is None:
        return None
    reason = cond.get("reason") or "JobFailed"
    message = cond.get("message") or f"the trainer Job failed ({reason})"
    failures = [_PodFailure(pod=p, cause=c) for p in failed_pods(pods) if (c := pod_failure(p)) is not None]
    if reason == DEADLINE_EXCEEDED:
        return Cause(DEADLINE_EXCEEDED, clip(f"runPolicy.activeDeadlineSeconds passed: {message}"))
    if reason == "PodFailurePolicy":
        for failed in reversed(failures):
            if (terminated_state(failed.pod) or {}).get("exitCode") in NON_RETRIABLE:
                return failed.cause
        return Cause("PodFailurePolicy", clip(message))
    if failures:
        last = failures[-1].cause
        if reason == BACKOFF_LIMIT_EXCEEDED and last.reason in {OOM_KILLED, *REASONS.values()}:
            return Cause(last.reason, clip(f"{last.message} ({message})"))
        return Cause(reason, clip(f"{message}; last failure: {last.message}"))
    return Cause(reason, clip(message))


def unschedulable(pods: list[dict[str, Any]]) -> Cause | None:
    """The scheduler's message for an active pod it cannot place."""
    for pod in pods:
        cond = pod_condition(pod, "PodScheduled")
        if is_active(pod) and cond and cond.get("status") == "False" and cond.get("reason") == UNSCHEDULABLE:
            return Cause(UNSCHEDULABLE, clip(cond.get("message") or "the scheduler cannot place the pod"))
    return None


def count_restarts(job: dict[str, Any] | None, pods: list[dict[str, Any]], previous: int = 0,
                   replaced: Collection[str] = ()) -> int:
    """Pods the Job controller had to replace: failures it counted plus those it ignored (disruptions, exit 75).

    ``replaced``: uids of ignored failures the watch reported, gone from the cluster or not (a deleted pod
    can vanish before any status write saw it failed); each pod counts once. Never goes down: replaced pods disappear, the count must not.
    At the end a failed Job's last failure is not a restart (nothing replaced that pod).
    """
    status = (job or {}).get("status") or {}
    failed = as_int(status.get("failed"))
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
    return Cause(reason, clip(f"the Job cannot create its pods: {message}"))
