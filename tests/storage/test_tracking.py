"""MLflow tracking against a real tracking server: params, the loss curve, eval losses, the forgetting
measurement and the output URI; a restarted process continues the run; a dead server never raises.
The sink is fed as the training loop feeds it (``StepRecord``/``EvalRecord`` per step and evaluation)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "trainer_image"))

from sft_contract.spec import MlflowSpec, TrainingSpec  # noqa: E402
from sft_contract.messages import ProgressReport
from sft_trainer.sinks import EvalRecord, StepRecord  # noqa: E402
from sft_trainer.tracking import MlflowSink, run_params  # noqa: E402
from storage_servers import free_port  # noqa: E402

SPEC = TrainingSpec.model_validate({
    "model": {"source": "org/model"},
    "dataset": {"train": {"source": "/data/train.jsonl"}, "general": {"source": "/data/general.jsonl"}},
    "hyperparameters": {"perDeviceBatchSize": 2, "gradientAccumulationSteps": 8},
    "output": {"destination": "s3://models/run-1"},
})


PROGRESS = ProgressReport(step=0, total_steps=20, epoch=0.0)


def train(sink: MlflowSink, first: int, last: int, evals: dict[int, float] = {}) -> None:
    """Steps ``first``..``last`` as the loop reports them, with an evaluation after the steps in ``evals``."""
    for s in range(first, last + 1):
        sink.on_step(StepRecord(s, s / 10, 3.0 - s * 0.1, 1e-4, 1.0, 1000, 100.0), PROGRESS)
        if s in evals:
            sink.on_eval(EvalRecord(s, s / 10, evals[s], min(evals[k] for k in evals if k <= s)), PROGRESS)


def test_a_run_records_params_losses_forgetting_and_the_output(mlflow_server, tmp_path):
    (tmp_path / "loss.png").write_bytes(b"\x89PNG")
    sink = MlflowSink(MlflowSpec(tracking_uri=mlflow_server.uri, experiment="sft-tests"), tmp_path,
                      run_params(SPEC, world_size=2), {"sft.job": "run-a"}, run_name="run-a")
    train(sink, 1, 10, {10: 2.5})
    time.sleep(0.5)
    train(sink, 11, 20, {20: 2.2})
    sink.close()  # the loop ends; the run stays open until the export names the output
    metrics = {"steps": 20, "totalSteps": 20, "bestEvalLoss": 2.2, "generalLossBefore": 3.1, "generalLossAfter": 3.3,
               "forgetting": 0.2, "precision": "fp32"}
    sink.end(metrics, "s3://models/run-1", artifacts=[tmp_path / "loss.png"])
    assert sink.warning is None

    client = mlflow_server.client()
    run = client.get_run(sink.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run-a"
    params = run.data.params
    assert params["effective_batch_size"] == "32"  # 2 x 8 x 2 processes
    assert params["learning_rate"] == str(SPEC.hyperparameters.learning_rate) and params["world_size"] == "2"
    assert params["precision_used"] == "fp32"
    curve = client.get_metric_history(sink.run_id, "train_loss")
    assert [m.step for m in sorted(curve, key=lambda m: m.step)] == list(range(1, 21))
    assert [m.value for m in client.get_metric_history(sink.run_id, "eval_loss")] == [2.5, 2.2]
    assert run.data.metrics["forgetting"] == 0.2 and run.data.metrics["general_loss_before"] == 3.1
    assert run.data.tags["sft.output_uri"] == "s3://models/run-1"
    assert [a.path for a in client.list_artifacts(sink.run_id)] == ["loss.png"]
    assert json.loads((tmp_path / ".mlflow-run.json").read_text())["runId"] == sink.run_id


def test_a_restarted_trainer_continues_the_same_run_without_repeating_steps(mlflow_server, tmp_path):
    first = MlflowSink(MlflowSpec(tracking_uri=mlflow_server.uri, experiment="sft-tests"), tmp_path, run_params(SPEC, 1),
                       run_name="run-b")
    train(first, 1, 8)
    first.end(None, None, status="KILLED")  # SIGTERM: a checkpoint at step 6, the pod is retried

    second = MlflowSink(MlflowSpec(tracking_uri=mlflow_server.uri, experiment="sft-tests"), tmp_path, run_params(SPEC, 1),
                        run_name="run-b")
    train(second, 7, 12)  # resumed from the checkpoint at step 6: steps 7 and 8 are done again
    second.end({"steps": 12}, "s3://models/run-1")
    assert second.run_id == first.run_id
    client = mlflow_server.client()
    assert client.get_run(second.run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(second.run_id, "train_loss")) == list(range(1, 13))


def test_a_dead_tracking_server_leaves_a_warning_and_never_raises(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    sink = MlflowSink(MlflowSpec(tracking_uri=uri), tmp_path, run_params(SPEC, 1))
    train(sink, 1, 50)
    sink.end({"steps": 50}, "s3://models/run-1")
    assert time.monotonic() - t0 < 60
    assert sink.run_id is None
    assert sink.warning.startswith(f"MLflow at {uri}: could not start the run")
