"""Training with object storage and tracking on the tiny model: `sftctl run` reads its model and data from a
real S3 server (moto), exports to it and logs to a real MLflow server; a dead MLflow server costs a warning,
never the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.trainer

pytest.importorskip("torch")

from storage_servers import free_port  # noqa: E402
from trainer_helpers import ROOT, run_module, trainer_env, write_config  # noqa: E402


def upload_dir(client, bucket: str, prefix: str, folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


def test_sftctl_run_reads_s3_exports_to_s3_and_logs_to_mlflow(tiny, s3_server, bucket, mlflow_server, tmp_path):
    client = s3_server.client()
    upload_dir(client, bucket, "models/tiny", tiny / "model")
    client.upload_file(str(tiny / "data" / "train.jsonl"), bucket, "data/train.jsonl")
    client.upload_file(str(tiny / "data" / "general.jsonl"), bucket, "data/general.jsonl")
    manifest = {
        "apiVersion": "sft.dev/v1alpha1", "kind": "SFTJob", "metadata": {"name": "s3-tiny"},
        "spec": {
            "model": {"source": f"s3://{bucket}/models/tiny"},
            "dataset": {"train": {"source": f"s3://{bucket}/data/train.jsonl"}, "validationSplit": 0.1,
                        "general": {"source": f"s3://{bucket}/data/general.jsonl", "mixRatio": 0.2, "heldOutRows": 50},
                        "maxSeqLength": 128},
            "hyperparameters": {"learningRate": 3e-3, "maxSteps": 12, "perDeviceBatchSize": 8,
                                "gradientAccumulationSteps": 1, "warmupRatio": 0.1},
            "evaluation": {"strategy": "steps", "steps": 6},
            "checkpointing": {"strategy": "steps", "steps": 6},
            "output": {"destination": f"s3://{bucket}/runs/s3-tiny"},
            "storage": {"s3": {"endpoint": s3_server.endpoint, "region": "us-east-1",
                               "credentialsSecretRef": {"name": "s3-credentials"}}},
            "tracking": {"mlflow": {"trackingUri": mlflow_server.uri, "experiment": "sftctl-run"}},
        },
    }
    path = tmp_path / "s3-tiny.yaml"
    path.write_text(yaml.safe_dump(manifest))
    assert subprocess.run([sys.executable, "-m", "sft_operator.cli.sftctl", "validate", "-q", str(path)],
                          env=trainer_env(), capture_output=True).returncode == 0
    env = trainer_env(**s3_server.env(SFT_CACHE_DIR=str(tmp_path / "cache"), COLUMNS="200"))
    result = subprocess.run([sys.executable, "-m", "sft_operator.cli.sftctl", "run", str(path)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="runs/s3-tiny/")["Contents"]}
    for name in ("model/model.safetensors", "model/config.json", "metrics.json", "trainer_log.jsonl", "loss.png", "COMPLETE"):
        assert f"runs/s3-tiny/{name}" in keys
    assert not any("/checkpoints/" in k for k in keys)
    complete = json.loads(client.get_object(Bucket=bucket, Key="runs/s3-tiny/COMPLETE")["Body"].read())
    assert "model/model.safetensors" in complete["files"]

    ml = mlflow_server.client()
    (run,) = ml.search_runs([ml.get_experiment_by_name("sftctl-run").experiment_id])
    assert run.info.run_name == "s3-tiny" and run.info.status == "FINISHED"
    assert run.info.run_id in result.stdout  # the summary shows the run id
    assert run.data.params["effective_batch_size"] == "8"
    assert run.data.params["model"] == f"s3://{bucket}/models/tiny"
    assert sorted(m.step for m in ml.get_metric_history(run.info.run_id, "train_loss")) == list(range(1, 13))
    assert len(ml.get_metric_history(run.info.run_id, "eval_loss")) >= 2
    assert "forgetting" in run.data.metrics
    assert run.data.tags["sft.output_uri"] == f"s3://{bucket}/runs/s3-tiny"


def test_training_succeeds_with_a_warning_when_mlflow_is_down(make_spec, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    spec = make_spec(hyperparameters={"maxSteps": 4}, evaluation={"strategy": "no"}, dataset={"validationSplit": 0.0},
                     tracking={"mlflow": {"trackingUri": uri}})
    cfg = write_config(spec, tmp_path / "config.json")
    log = tmp_path / "termination-log"
    result = run_module("sft_trainer", "--config", str(cfg), env=trainer_env(SFT_TERMINATION_LOG=str(log)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"MLflow at {uri}: could not start the run" in result.stderr
    outcome = json.loads(log.read_text())  # the result the operator reads from the finished pod
    assert outcome["outputUri"] == spec["output"]["destination"]
    assert outcome["warning"].startswith(f"MLflow at {uri}")
    assert (tmp_path / "out" / "model" / "model.safetensors").exists()
