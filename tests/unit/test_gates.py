"""The evaluation gate's judgement (pure): gates + base + tuned -> per-gate results and the verdict."""

from __future__ import annotations

import pytest
from sft_trainer import gates
from sft_contract.spec import Gate


def gate(**fields) -> Gate:
    return Gate.model_validate(fields)


@pytest.mark.parametrize("fields, base, tuned, passed", [
    ({"metric": "evalLoss", "threshold": 1.5}, 2.0, 1.4, True),
    ({"metric": "evalLoss", "threshold": 1.5}, 2.0, 1.6, False),  # lower is better by default
    ({"metric": "tokenAccuracy", "threshold": 0.5}, 0.1, 0.6, True),  # higher is better by default
    ({"metric": "tokenAccuracy", "threshold": 0.5}, 0.1, 0.4, False),
    ({"metric": "evalLoss", "minChange": 0.5}, 2.0, 1.5, True),  # exactly the change asked for
    ({"metric": "evalLoss", "minChange": 0.5}, 2.0, 1.6, False),
    ({"metric": "exactMatch", "minChange": 0.2}, 0.3, 0.5, True),
    ({"metric": "exactMatch", "minChange": 0.2}, 0.3, 0.45, False),
    ({"metric": "forgettingDelta", "threshold": 0.1}, 0.0, 0.05, True),
    ({"metric": "forgettingDelta", "threshold": 0.1}, 0.0, 0.2, False),
    ({"metric": "contains", "minChange": -0.1}, 0.5, 0.45, True),  # a tolerated regression
    ({"metric": "contains", "minChange": -0.1}, 0.5, 0.35, False),
    ({"metric": "evalLoss", "direction": "higher", "threshold": 1.0}, 0.5, 1.2, True),  # the direction overrides
    ({"metric": "evalLoss", "threshold": 1.5, "minChange": 0.5}, 1.8, 1.4, False),  # both must hold
    ({"metric": "evalLoss", "threshold": 1.5, "minChange": 0.5}, 2.0, 1.4, True),
])
def test_threshold_and_min_change_in_the_metrics_direction(fields, base, tuned, passed):
    result = gates.judge([gate(**fields)], {fields["metric"]: base}, {fields["metric"]: tuned})
    assert result.passed is passed and result.gates[0].passed is passed
    assert (result.gates[0].message is None) is passed


def test_float_noise_at_the_boundary_passes():
    result = gates.judge([gate(metric="tokenAccuracy", minChange=0.2)], {"tokenAccuracy": 0.1},
                         {"tokenAccuracy": 0.30000000000000004 - 1e-12})
    assert result.passed


def test_a_metric_not_measured_fails_its_gate_and_says_so():
    result = gates.judge([gate(metric="evalLoss", threshold=1.0), gate(metric="contains", minChange=0.1)],
                         {}, {"contains": 0.5})
    assert [g.passed for g in result.gates] == [False, False]
    assert result.gates[0].message == "not measured on the tuned model"
    assert "base model's value is missing" in result.gates[1].message


def test_messages_name_the_numbers_and_only_fail_gates_reject():
    gs = [gate(metric="evalLoss", minChange=0.5), gate(metric="exactMatch", threshold=0.8, onFail="Mark")]
    result = gates.judge(gs, {"evalLoss": 2.0, "exactMatch": 0.1}, {"evalLoss": 1.8, "exactMatch": 0.5})
    assert result.passed is False
    assert result.gates[0].message == "tuned 1.8 vs base 2: change 0.2 < minChange 0.5 (lower is better)"
    assert result.gates[1].message == "tuned 0.5 < threshold 0.8"
    assert gates.rejects(result)
    metrics = {"evaluation": result.model_dump(mode="json", by_alias=True), "outputModel": "s3://b/p/rejected/model"}
    reason = gates.rejection(metrics)
    assert reason == ("evaluation gate failed: gate evalLoss: tuned 1.8 vs base 2: change 0.2 < minChange 0.5 "
                      "(lower is better); the model is kept in s3://b/p/rejected/model, not in model/")

    marked = gates.judge(gs[1:], {"exactMatch": 0.1}, {"exactMatch": 0.5})
    assert marked.passed is False and not gates.rejects(marked)
    assert gates.rejection({"evaluation": marked.model_dump(mode="json", by_alias=True)}) is None
    assert gates.rejection({}) is None


def test_the_baseline_has_base_values_and_no_verdict_yet():
    result = gates.baseline([gate(metric="evalLoss", threshold=1.0)], {"evalLoss": 2.5})
    assert result.passed is None
    assert result.gates[0].base == 2.5 and result.gates[0].tuned is None and result.gates[0].passed is None


@pytest.mark.parametrize("answer, expected, exact, contains", [
    ("42", "42", True, True),
    ("  42\n", "42", True, True),
    ("the answer is 42", "42", False, True),
    ("4 2", "42", False, False),
    ("APPLE", "apple", False, False),  # case counts: "Spell ... in capitals" is a task
    ("red  blue\ngreen", "red blue green", True, True),  # whitespace collapsed
])
def test_generation_scores_exact_match_and_contains(answer, expected, exact, contains):
    assert gates.score(answer, expected) == (exact, contains)


def test_the_reports_after_training_still_carry_the_verdict(tmp_path):
    """The operator keeps the latest progress report; the tracked run's last one must not drop the gates."""
    from sft_contract.spec import TrainingSpec
    from sft_trainer.run_hooks import RunHooks

    class Tracker:
        run_id, warning = "run-1", None

        def end(self, *args, **kwargs):
            pass

    class Reporter:
        reports: list = []

        def report(self, report, final=False):
            self.reports.append(report)

    spec = TrainingSpec.model_validate({"model": {"source": "org/m"}, "dataset": {"train": {"source": "/d/t.jsonl"}},
                                        "output": {"destination": str(tmp_path / "out")}})
    verdict = gates.judge([gate(metric="evalLoss", threshold=1.0)], {"evalLoss": 2.0}, {"evalLoss": 1.5})
    metrics = {"steps": 3, "totalSteps": 3, "evaluation": verdict.model_dump(mode="json", by_alias=True)}
    reporter = Reporter()
    RunHooks(spec, 0, tracker=Tracker()).succeeded(metrics, reporter=reporter)
    assert reporter.reports and reporter.reports[-1].evaluation == verdict
