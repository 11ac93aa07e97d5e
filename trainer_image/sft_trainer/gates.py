"""The evaluation gate's judgement: gates + base metrics + tuned metrics -> results (pure, no torch).

A gate follows MLflow's ``MetricThreshold``: the tuned value must reach an absolute ``threshold`` and/or beat
the base model's value by ``minChange``, both in the gate's direction. The base model is measured on the same
data at the start of the run (``train.start``), the tuned model at the end (``train.finish``).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from sft_contract.messages import EvaluationResult, GateOutcome
from sft_contract.spec import Gate, GateMetric, OnFail

# Float noise (0.3 - 0.1) must not fail a gate set exactly at the boundary.
EPSILON = 1e-9


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def judge_one(gate: Gate, base: float | None, tuned: float | None) -> GateOutcome:
    lower = gate.better == "lower"
    problems: list[str] = []
    if tuned is None:
        problems.append("not measured on the tuned model")
    else:
        if gate.threshold is not None:
            ok = tuned <= gate.threshold + EPSILON if lower else tuned >= gate.threshold - EPSILON
            if not ok:
                problems.append(f"tuned {_fmt(tuned)} {'>' if lower else '<'} threshold {_fmt(gate.threshold)}")
        if gate.min_change is not None:
            if base is None:
                problems.append("the base model's value is missing, so minChange cannot be judged")
            else:
                change = base - tuned if lower else tuned - base
                if change < gate.min_change - EPSILON:
                    problems.append(f"tuned {_fmt(tuned)} vs base {_fmt(base)}: change {_fmt(change)} < minChange "
                                    f"{_fmt(gate.min_change)} ({gate.better} is better)")
    return GateOutcome(
        metric=gate.metric, direction=gate.better, base=base, tuned=tuned, threshold=gate.threshold,
        min_change=gate.min_change, on_fail=gate.on_fail, passed=not problems,
        message="; ".join(problems)[:256] or None,
    )


def judge(gates: Sequence[Gate], base: Mapping[str, float | None], tuned: Mapping[str, float | None]) -> EvaluationResult:
    """Every gate judged on ``tuned`` (metric name -> value) against ``base`` (the base model's values)."""
    outcomes = [judge_one(g, base.get(g.metric), tuned.get(g.metric)) for g in gates]
    return EvaluationResult(passed=all(o.passed for o in outcomes), gates=outcomes)


def baseline(gates: Sequence[Gate], base: Mapping[str, float | None]) -> EvaluationResult:
    """The gates before the tuned model is measured: base values only, no verdict (reported while training)."""
    return EvaluationResult(gates=[
        GateOutcome(metric=g.metric, direction=g.better, base=base.get(g.metric), threshold=g.threshold,
                    min_change=g.min_change, on_fail=g.on_fail)
        for g in gates
    ])


def failed(result: EvaluationResult, on_fail: str | None = None) -> list[GateOutcome]:
    """The gates that failed (only those with ``on_fail``, when given)."""
    return [g for g in result.gates if g.passed is False and (on_fail is None or g.on_fail == on_fail)]


def rejects(result: EvaluationResult | None) -> bool:
    """Whether the model is rejected: a gate with onFail Fail failed."""
    return result is not None and bool(failed(result, OnFail.fail.value))


def describe(outcomes: Sequence[GateOutcome]) -> str:
    """One line naming each gate and its numbers, for a failure reason, a condition or an Event."""
    return "; ".join(f"gate {g.metric}: {g.message or 'passed'}" for g in outcomes)


def score(answer: str, expected: str) -> tuple[bool, bool]:
    """A generated answer against the expected one: (exact match, contains), whitespace collapsed, case kept."""
    a, e = " ".join(answer.split()), " ".join(expected.split())
    return a == e, e in a


def rejection(metrics: Mapping[str, object]) -> str | None:
    """The reason a finished run's model is rejected (a failed gate with onFail Fail), from its metrics; else None."""
    doc = metrics.get("evaluation")
    if not doc:
        return None
    bad = failed(EvaluationResult.model_validate(doc), OnFail.fail.value)
    if not bad:
        return None
    return (f"evaluation gate failed: {describe(bad)}; the model is kept in {metrics.get('outputModel')}, "
            "not in model/")


__all__ = ["judge", "judge_one", "baseline", "failed", "rejects", "describe", "rejection", "score", "GateMetric"]
