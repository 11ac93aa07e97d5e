"""The conditions of a status: one per type from the observation, times stamped, and EvaluationPassed
(pure)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sft_contract.exit_codes import REASONS, ExitCode
from sft_operator.api.types import EVALUATION_PASSED
from sft_operator.core.status.vocabulary import (
    CREATED,
    FAILED,
    FAILED_C,
    QUEUED,
    QUEUED_C,
    RESTARTING,
    RESTARTING_C,
    RUNNING,
    RUNNING_C,
    SUCCEEDED,
    SUCCEEDED_C,
    SUSPENDED,
    SUSPENDED_C,
    Observation,
    clip,
    format_time,
)


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


def _number(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def evaluation_condition(status: dict[str, Any]) -> dict[str, Any] | None:
    """EvaluationPassed, from status.evaluation and the job's end; None for a job without gates (pure)."""
    if status.get("phase") == FAILED and status.get("reason") == REASONS[ExitCode.EVALUATION_FAILED]:
        failed = condition(status, FAILED_C) or {}
        return _condition(EVALUATION_PASSED, False, REASONS[ExitCode.EVALUATION_FAILED],
                          clip(failed.get("message") or "an evaluation gate failed"))
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
        return _condition(EVALUATION_PASSED, True, "GatesPassed", clip(f"all {len(gates)} gate(s) passed: {summary}"))
    rejected = any(g.get("passed") is False and g.get("onFail") == "Fail" for g in gates)
    reason = REASONS[ExitCode.EVALUATION_FAILED] if rejected else "GatesFailed"
    failed = [g for g in gates if g.get("passed") is False]
    return _condition(EVALUATION_PASSED, False, reason,
                      clip(f"{len(failed)} of {len(gates)} gate(s) failed: {summary}"))


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


def condition(status: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    for cond in (status or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return cond
    return None
