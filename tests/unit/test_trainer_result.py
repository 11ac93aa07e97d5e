"""The trainer's side of the result contract: what rank 0 leaves in its termination message (light:
no torch; the operator's side is in test_status.py and test_writer.py)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from sft_contract.messages import ProgressReport, TrainerResult
from sft_trainer.result import TERMINATION_LIMIT, termination_message, result_from_metrics, write_result

METRICS = {"steps": 90, "totalSteps": 100, "epochs": 2.7, "trainLoss": 0.81, "evalLoss": 0.93, "bestEvalLoss": 0.9,
           "bestCheckpoint": "pvc://models/run/checkpoints/checkpoint-60", "stoppedEarly": True,
           "generalLossBefore": 2.1, "generalLossAfter": 2.2, "tokensPerSecond": 1234.5,
           "outputModel": "pvc://models/run/model", "data": {"rows": 1000}, "precision": "bf16"}


def test_a_successful_run_writes_its_result_as_json(tmp_path, monkeypatch):
    path = tmp_path / "termination-log"
    monkeypatch.setenv("SFT_TERMINATION_LOG", str(path))
    monkeypatch.delenv("RANK", raising=False)
    write_result(METRICS)
    written = json.loads(path.read_text())
    assert written["outputModel"] == "pvc://models/run/model" and written["bestEvalLoss"] == 0.9
    assert written["stoppedEarly"] is True and "data" not in written  # only the contract's fields
    assert TrainerResult.model_validate(written).best_checkpoint.endswith("checkpoint-60")


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    path = tmp_path / "termination-log"
    monkeypatch.setenv("SFT_TERMINATION_LOG", str(path))
    monkeypatch.setenv("RANK", "3")
    write_result(METRICS)
    assert not path.exists()


def test_the_message_never_exceeds_what_the_kubelet_keeps():
    longest = TrainerResult(output_model="pvc://m/" + "x" * 1016, output_uri="s3://b/" + "y" * 1017,
                            best_checkpoint="pvc://m/" + "z" * 1016, mlflow_run_id="r" * 64, warning="w" * 1024, steps=10**9,
                            total_steps=10**9, epochs=1e6, train_loss=1e6, eval_loss=1e6, best_eval_loss=1e6,
                            general_loss_before=1e6, general_loss_after=1e6, tokens_per_second=1e12)
    text = termination_message(longest)  # the warning goes first when everything is at its maximum
    assert len(text.encode()) <= TERMINATION_LIMIT and json.loads(text)["outputModel"] == longest.output_model
    wide = longest.model_copy(update={"output_model": "pvc://m/" + "é" * 1016, "best_checkpoint": "pvc://m/" + "ü" * 1016,
                                      "warning": None})
    text = termination_message(wide)  # two-byte characters: optional locations are dropped until it fits
    assert len(text.encode()) <= TERMINATION_LIMIT
    assert json.loads(text)["outputModel"] == wide.output_model and "bestCheckpoint" not in json.loads(text)
    with pytest.raises(ValueError, match="4096"):
        termination_message(wide.model_copy(update={"output_model": "\U0001d11e" * 1024, "output_uri": None,
                                                    "best_checkpoint": None}))


def test_the_result_comes_from_the_final_metrics():
    result = result_from_metrics(METRICS)
    assert (result.steps, result.total_steps, result.epochs) == (90, 100, 2.7)
    assert result.output_uri is None and result.mlflow_run_id is None  # filled in when uploads/tracking exist
    exported = result_from_metrics({**METRICS, "outputUri": "s3://bucket/run", "mlflowRunId": "abc123"})
    assert (exported.output_uri, exported.mlflow_run_id) == ("s3://bucket/run", "abc123")


def test_a_result_without_the_model_location_is_still_read():
    """An earlier trainer's message (export location and run id only) is still a result."""
    result = TrainerResult.model_validate_json('{"outputUri":"s3://bucket/run","mlflowRunId":"abc123"}')
    assert result.output_model is None and result.output_uri == "s3://bucket/run"


# What a trainer of the previous release wrote, key for key (its fields were spelled out in each message).
EARLIER_RESULT = {"outputModel": "pvc://models/run/model", "outputUri": "s3://bucket/run",
                  "bestCheckpoint": "pvc://models/run/checkpoints/checkpoint-60", "mlflowRunId": "abc123",
                  "warning": "tracking lost", "steps": 90, "totalSteps": 100, "epochs": 2.7, "stoppedEarly": True,
                  "trainLoss": 0.81, "evalLoss": 0.93, "bestEvalLoss": 0.9, "generalLossBefore": 2.1,
                  "generalLossAfter": 2.2, "tokensPerSecond": 1234.5}
EARLIER_REPORT = {"step": 5, "totalSteps": 10, "epoch": 0.5, "trainLoss": 1.2, "evalLoss": 1.3, "bestEvalLoss": 1.25,
                  "learningRate": 1e-4, "tokensPerSecond": 900.0, "etaSeconds": 30, "effectiveBatchSize": 8,
                  "generalLossBefore": 2.0, "generalLossAfter": 2.1, "outputModel": "pvc://m/model",
                  "bestCheckpoint": "pvc://m/checkpoints/checkpoint-4", "message": "eval", "stage": "training"}


def test_the_messages_on_the_wire_are_those_of_the_previous_release():
    """Old and new trainers and operators read each other: the same camelCase keys, flat, the same values."""
    result = TrainerResult.model_validate(EARLIER_RESULT)
    assert json.loads(termination_message(result)) == EARLIER_RESULT
    assert result_from_metrics({**METRICS, **EARLIER_RESULT}).model_dump(by_alias=True, exclude_none=True) == EARLIER_RESULT
    report = ProgressReport.model_validate(EARLIER_REPORT)
    assert report.model_dump(mode="json", by_alias=True, exclude_none=True) == EARLIER_REPORT
    # The trainer's log line is this JSON: it starts with where the run is, as people and scripts read it.
    assert list(report.model_dump(by_alias=True, exclude_none=True))[:4] == ["step", "totalSteps", "epoch", "trainLoss"]
    assert TrainerResult.model_validate({**EARLIER_RESULT, "newerField": 1}).train_loss == 0.81  # unknown: ignored


def test_the_run_metrics_keep_their_bounds():
    for model in (ProgressReport, TrainerResult):
        for field, value in (("trainLoss", -1.0), ("generalLossAfter", 2e6), ("tokensPerSecond", float("nan"))):
            base = {"step": 1, "totalSteps": 2, "epoch": 0.0} if model is ProgressReport else {}
            with pytest.raises(ValidationError, match=field):
                model.model_validate({**base, field: value})
