"""What follows a status change: the Events, the log line and the metric records (``Effects``, pure)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from sft_operator.api.types import EVALUATION_PASSED, TERMINAL_PHASES
from sft_operator.core.status.conditions import condition
from sft_operator.core.status.vocabulary import CREATED, FAILED, RESTARTING_C, RUNNING, SUCCEEDED, as_int, parse_time

COMPLETED_WITH_WARNING = "CompletedWithWarning"  # the Event for a result's warning


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event for a person to act on."""

    type: str  # Normal or Warning
    reason: str
    message: str


class Finished(NamedTuple):
    """A job that just ended, for the metrics."""

    result: str  # the terminal phase
    reason: str
    seconds: float | None  # from its start; None when either time is unknown


@dataclass(frozen=True)
class Effects:
    """What follows one status change; the writer applies it."""

    events: tuple[Event, ...] = ()
    log: str | None = None  # one line for the operator log
    started: bool = False  # first Running: record the time to running
    finished: Finished | None = None  # the job just ended
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
    restarts, old_restarts = as_int(after.get("restarts")), as_int(before.get("restarts"))
    if restarts > old_restarts:
        cond = condition(after, RESTARTING_C) or {}
        events.append(Event(type="Warning", reason="Restarted",
                            message=f"trainer pod replaced (restart {restarts})"
                            + (f": {cond['message']}" if cond.get("message") else "")))
    created, old_created = condition(after, CREATED) or {}, condition(before, CREATED) or {}
    if created.get("reason") in _CREATION_WARNINGS and (created.get("reason"), created.get("message")) != (
        old_created.get("reason"), old_created.get("message")
    ):
        events.append(Event(type="Warning", reason=created["reason"], message=created.get("message", "")))
    started = phase == RUNNING and old_phase != RUNNING and not before.get("startTime")
    finished = None
    if phase in TERMINAL_PHASES and old_phase not in TERMINAL_PHASES:
        cond = condition(after, phase) or {}
        reason = cond.get("reason", phase)
        finished = Finished(result=phase, reason=reason, seconds=duration_seconds(after))
        if phase == FAILED:
            events.append(Event(type="Warning", reason="Failed", message=f"{reason}: {cond.get('message', '')}"))
    if phase == SUCCEEDED and result_warning:  # with Succeeded, or later if rank 0's pod showed its result later
        events.append(Event(type="Warning", reason=COMPLETED_WITH_WARNING, message=result_warning))
    judged = None
    gate, old_gate = condition(after, EVALUATION_PASSED) or {}, condition(before, EVALUATION_PASSED) or {}
    if gate.get("status") in ("True", "False") and (gate.get("status"), gate.get("reason")) != (
        old_gate.get("status"), old_gate.get("reason")
    ):
        judged = gate["status"] == "True"
        events.append(Event(type="Normal" if judged else "Warning", reason=gate.get("reason", EVALUATION_PASSED),
                            message=gate.get("message", "")))
    return Effects(events=tuple(events), log=log, started=started, finished=finished, evaluation_passed=judged)


def duration_seconds(status: dict[str, Any]) -> float | None:
    start, end = parse_time(status.get("startTime")), parse_time(status.get("completionTime"))
    return (end - start).total_seconds() if start and end else None
