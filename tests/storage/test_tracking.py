"""MLflow tracking against a real tracking server: params, the loss curve, eval losses, the forgetting
measurement and the output URI; a restarted process continues the run; a dead server never raises."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "trainer_image"))

from sft_trainer.config import MlflowSpec, TrainingSpec  # noqa: E402
from sft_trainer.tracking import LogFollower, MlflowTracker, run_params  # noqa: E402
from storage_servers import free_port  # noqa: E402

SPEC = TrainingSpec.model_validate({
    "model": {"source": "org/model"},
    "dataset": {"train": {"source": "/data/train.jsonl"}, "general": {"source": "/data/general.jsonl"}},
    "hyperparameters": {"perDeviceBatchSize": 2, "gradientAccumulationSteps": 8},
    "output": {"destination": "s3://models/run-1"},
})


def write_log(path: Path, records: list[dict]) -> None:
    with path.open("a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def steps(start: int, end: int) -> list[dict]:
    return [{"step": s, "epoch": s / 10, "loss": 3.0 - s * 0.1, "learningRate": 1e-4, "gradNorm": 1.0, "tokensPerSecond": 100.0}
            for s in range(start, end + 1)]


def test_a_run_records_params_losses_forgetting_and_the_output(mlflow_server, tmp_path):
    (tmp_path / "loss.png").write_bytes(b"\x89PNG")
    tracker = MlflowTracker(MlflowSpec(tracking_uri=mlflow_server.uri, experiment="sft-tests"), tmp_path, run_name="run-a")
    tracker.on_start(run_params(SPEC, world_size=2), {"sft.job": "run-a"})
    log = tmp_path / "trainer_log.jsonl"
    follower = LogFollower(log, tracker, interval_s=0.1).start()
    write_log(log, steps(1, 10) + [{"step": 10, "epoch": 1.0, "evalLoss": 2.5}])
    time.sleep(0.5)
    write_log(log, steps(11, 20) + [{"step": 20, "epoch": 2.0, "evalLoss": 2.2}])
    follower.stop()
    metrics = {"steps": 20, "totalSteps": 20, "bestEvalLoss": 2.2, "generalLossBefore": 3.1, "generalLossAfter": 3.3,
               "forgetting": 0.2, "precision": "fp32"}
    tracker.on_end(metrics, "s3://models/run-1", artifacts=[tmp_path / "loss.png"])
    assert tracker.warning is None

    client = mlflow_server.client()
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run-a"
    params = run.data.params
    assert params["effective_batch_size"] == "32"  # 2 x 8 x 2 processes
    assert params["learning_rate"] == str(SPEC.hyperparameters.learning_rate) and params["world_size"] == "2"
    assert params["precision_used"] == "fp32"
    curve = client.get_metric_history(tracker.run_id, "train_loss")
    assert [m.step for m in sorted(curve, key=lambda m: m.step)] == list(range(1, 21))
    assert [m.value for m in client.get_metric_history(tracker.run_id, "eval_loss")] == [2.5, 2.2]
    assert run.data.metrics["forgetting"] == 0.2 and run.data.metrics["general_loss_before"] == 3.1
    assert run.data.tags["sft.output_uri"] == "s3://models/run-1"
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["loss.png"]
    assert json.loads((tmp_path / ".mlflow-run.json").read_text())["runId"] == tracker.run_id


def test_a_restarted_trainer_continues_the_same_run_without_repeating_steps(mlflow_server, tmp_path):
    log = tmp_path / "trainer_log.jsonl"
    first = MlflowTracker(MlflowSpec(tracking_uri=mlflow_server.uri, experiment="sft-tests"), tmp_path, run_name="run-b")
    first.on_start(run_params(SPEC, 1))
    follower = LogFollower(log, first, interval_s=0.1).start()
    write_log(log, steps(1, 8))
    follower.stop()
    first.on_end(None, None, status="KILLED")  # SIGTERM: a checkpoint at step 8, the pod is retried

    second = MlflowTracker(MlflowSpec(tracking_uri=mlflow_server.uri, experiment="sft-tests"), tmp_path, run_name="run-b")
    second.on_start(run_params(SPEC, 1))
    follower = LogFollower(log, second, interval_s=0.1).start()  # reads the old lines again, then new ones
    write_log(log, steps(9, 12))
    follower.stop()
    second.on_end({"steps": 12}, "s3://models/run-1")
    assert second.run_id == first.run_id
    client = mlflow_server.client()
    assert client.get_run(second.run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(second.run_id, "train_loss")) == list(range(1, 13))


def test_a_dead_tracking_server_leaves_a_warning_and_never_raises(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    tracker = MlflowTracker(MlflowSpec(tracking_uri=uri), tmp_path)
    tracker.on_start(run_params(SPEC, 1))
    for record in steps(1, 50):
        tracker.on_step(record)
    tracker.on_end({"steps": 50}, "s3://models/run-1")
    assert time.monotonic() - t0 < 60
    assert tracker.run_id is None
    assert tracker.warning.startswith(f"MLflow at {uri}: could not start the run")
