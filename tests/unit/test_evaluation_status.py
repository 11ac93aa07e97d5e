"""The evaluation gate in status: status.evaluation from progress and the result, the EvaluationPassed condition,
its Event, the gauge and the printer column, for a job whose gates pass, fail with Mark and fail with Fail."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from prometheus_client import generate_latest
from sft_contract.messages import EvaluationResult, ProgressReport, TrainerResult

from sft_operator.api import crd
from sft_operator.runtime import metrics
from sft_operator.core import status as st

from .test_status import jcond, job, pod, sftjob, terminated

NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=timezone.utc)
T0 = "2026-11-28T11:50:00Z"
T1 = "2026-11-28T11:55:00Z"


def gate(metric: str, base: float, tuned: float | None = None, passed: bool | None = None, on_fail: str = "Fail",
         message: str | None = None) -> dict:
    doc = {"metric": metric, "direction": "lower" if metric == "evalLoss" else "higher", "base": base,
           "threshold": 0.5, "onFail": on_fail}
    if tuned is not None:
        doc |= {"tuned": tuned, "passed": passed}
    if message:
        doc["message"] = message
    return doc


def evaluation(passed: bool | None, *gates: dict) -> EvaluationResult:
    return EvaluationResult.model_validate({"passed": passed, "gates": list(gates)})


BASELINE = evaluation(None, gate("evalLoss", 2.5), gate("exactMatch", 0.1))
PASSED = evaluation(True, gate("evalLoss", 2.5, 0.4, True), gate("exactMatch", 0.1, 0.6, True))
MARKED = evaluation(False, gate("evalLoss", 2.5, 0.4, True),
                    gate("exactMatch", 0.1, 0.3, False, "Mark", "tuned 0.3 < threshold 0.5"))
REJECTED = evaluation(False, gate("evalLoss", 2.5, 0.9, False, message="tuned 0.9 > threshold 0.5"))


def running() -> dict:
    return {"phase": "Running", "reason": "PodsRunning", "observedGeneration": 1,
            "conditions": [{"type": "Running", "status": "True", "reason": "PodsRunning", "message": ""}]}


def report(ev: EvaluationResult, step: int = 5) -> ProgressReport:
    return ProgressReport(step=step, total_steps=10, epoch=0.5, evaluation=ev)


def the(status: dict) -> dict:
    return st.condition(status, "EvaluationPassed")


def test_while_training_the_base_values_show_and_the_condition_is_unknown():
    status = st.with_evaluation_condition(st.with_progress(running(), report(BASELINE)), None, NOW)
    assert status["evaluation"]["gates"][0] == {"metric": "evalLoss", "direction": "lower", "base": 2.5,
                                                "threshold": 0.5, "onFail": "Fail"}
    cond = the(status)
    assert (cond["status"], cond["reason"]) == ("Unknown", "Measuring")
    assert cond["observedGeneration"] == 1
    effects = st.transition(running(), status)
    assert effects.events == () and effects.evaluation_passed is None  # nothing to act on yet


def test_passing_gates_set_the_condition_true_with_an_event_and_the_gauge():
    before = st.with_evaluation_condition(st.with_progress(running(), report(BASELINE)), None, NOW)
    done = {**before, "phase": "Succeeded", "reason": "Completed"}
    after = st.with_evaluation_condition(st.with_result(done, TrainerResult(output_model="pvc://m/run/model",
                                                                            evaluation=PASSED)), before, NOW)
    cond = the(after)
    assert (cond["status"], cond["reason"]) == ("True", "GatesPassed")
    assert cond["message"] == "all 2 gate(s) passed: evalLoss: base 2.5, tuned 0.4; exactMatch: base 0.1, tuned 0.6"
    assert after["evaluation"]["passed"] is True
    effects = st.transition(before, after)
    assert effects.evaluation_passed is True
    assert ("Normal", "GatesPassed") in [(e.type, e.reason) for e in effects.events]
    # Written again unchanged: the condition keeps its time and no second Event follows.
    later = st.with_evaluation_condition(after, after, NOW + timedelta(minutes=5))
    assert the(later)["lastTransitionTime"] == cond["lastTransitionTime"]
    assert st.transition(after, later).events == ()


def test_a_mark_gate_that_fails_succeeds_with_the_condition_false():
    done = {**running(), "phase": "Succeeded", "reason": "Completed"}
    after = st.with_evaluation_condition(st.with_result(done, TrainerResult(output_model="pvc://m/run/model",
                                                                            evaluation=MARKED)), done, NOW)
    cond = the(after)
    assert (after["phase"], cond["status"], cond["reason"]) == ("Succeeded", "False", "GatesFailed")
    assert "1 of 2 gate(s) failed" in cond["message"] and "exactMatch: base 0.1, tuned 0.3 (tuned 0.3 < threshold 0.5)" in cond["message"]
    effects = st.transition(done, after)
    assert effects.evaluation_passed is False
    assert [(e.type, e.reason) for e in effects.events] == [("Warning", "GatesFailed")]


def test_a_fail_gate_fails_the_job_as_evaluation_failed_naming_the_gate():
    reason = ("evaluation gate failed: gate evalLoss: tuned 0.9 > threshold 0.5; the model is kept in "
              "pvc://models/run/rejected/model, not in model/")
    failed_job = job([jcond("Failed", "PodFailurePolicy", "exit code 80")], failed=1)
    pods = [pod(phase="Failed", state=terminated(80, "Error", reason))]
    current = st.with_progress(running(), report(REJECTED, step=10))  # the trainer's last report: the verdict
    derived = st.derive_status(sftjob(current), failed_job, pods, NOW)
    status = st.with_evaluation_condition({**current, **derived}, current, NOW)
    assert (status["phase"], status["reason"]) == ("Failed", "EvaluationFailed")
    cond = the(status)
    assert (cond["status"], cond["reason"]) == ("False", "EvaluationFailed")
    assert "gate evalLoss: tuned 0.9 > threshold 0.5" in cond["message"] and "rejected/model" in cond["message"]
    assert status["evaluation"]["gates"][0]["tuned"] == 0.9
    effects = st.transition(running(), status)
    assert effects.evaluation_passed is False
    assert ("Warning", "Failed") in [(e.type, e.reason) for e in effects.events]


def test_a_late_baseline_never_replaces_a_verdict_and_jobs_without_gates_have_no_condition():
    judged = st.with_progress(running(), report(PASSED))
    again = st.with_progress(judged, report(BASELINE, step=6))
    assert again["evaluation"]["passed"] is True
    plain = st.with_evaluation_condition(running(), None, NOW)
    assert the(plain) is None and "evaluation" not in plain


def test_the_gauge_is_kept_after_the_job_ends_and_dropped_with_the_sftjob():
    metrics.set_evaluation_passed("ns-gate", "job-a", False)
    scrape = generate_latest(metrics.REGISTRY).decode()
    assert 'sft_job_evaluation_passed{namespace="ns-gate",sftjob="job-a"} 0.0' in scrape
    metrics.remove_job("ns-gate", "job-a")  # the job ended: the verdict stays
    assert 'sftjob="job-a"' in generate_latest(metrics.REGISTRY).decode()
    metrics.remove_job("ns-gate", "job-a", deleted=True)
    assert 'sftjob="job-a"' not in generate_latest(metrics.REGISTRY).decode()


def test_kubectl_get_shows_the_evaluation_reason():
    column = next(c for c in crd.PRINTER_COLUMNS if c["name"] == "Evaluation")
    assert column["jsonPath"] == '.status.conditions[?(@.type=="EvaluationPassed")].reason'
    assert column.get("priority", 0) == 0  # in the default view


def test_sftctl_status_shows_the_gate_table():
    from rich.console import Console

    from sft_operator.cli.status_view import status_panel

    sftjob = {"metadata": {"name": "demo", "namespace": "team-a"},
              "status": {"phase": "Succeeded", "evaluation": MARKED.model_dump(mode="json", by_alias=True)}}
    console = Console(width=200, record=True, color_system=None)
    console.print(status_panel(sftjob))
    text = console.export_text()
    assert "evaluation gates: FAILED" in text
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") > 5}
    assert "2.5" in rows["evalLoss"] and "0.4" in rows["evalLoss"] and "passed" in rows["evalLoss"]
    assert "failed: tuned 0.3 < threshold 0.5" in rows["exactMatch"] and "Mark" in rows["exactMatch"]
