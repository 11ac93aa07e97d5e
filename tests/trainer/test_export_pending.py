"""A trained model is never lost to its export: the output is proved writable before training, and a model
whose export failed stays on the cache volume with a marker, so that the next attempt of the same run
exports it without training again."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.trainer

pytest.importorskip("torch")

from sft_trainer import __main__ as entry  # noqa: E402
from sft_contract.exit_codes import ExitCode  # noqa: E402

from storage_servers import FaultyProxy  # noqa: E402
from trainer_helpers import trainer_env, write_config  # noqa: E402


@pytest.mark.parametrize("rerun_id", ["uid-p1", "uid-p2"], ids=["the same job retried", "a new job on the kept claim"])
def test_a_model_whose_export_failed_is_kept_and_the_next_attempt_exports_it_without_training(
        make_spec, s3_server, bucket, tmp_path, rerun_id):
    proxy = FaultyProxy(s3_server.port)
    spec = make_spec(hyperparameters={"maxSteps": 40, "perDeviceBatchSize": 2}, evaluation={"strategy": "no"},
                     dataset={"validationSplit": 0}, output={"destination": f"s3://{bucket}/runs/p1"},
                     storage={"s3": {"endpoint": proxy.endpoint}})
    cfg = write_config(spec, tmp_path / "config.json")
    term = tmp_path / "termination-log"
    env = trainer_env(**s3_server.env(SFT_CACHE_DIR=str(tmp_path / "cache"), SFT_RUN_ID="uid-p1",
                                      SFT_TERMINATION_LOG=str(term), SFT_STORAGE_BACKOFF="0.05",
                                      SFT_STORAGE_RETRY_SECONDS="3"))
    staging = tmp_path / "cache" / "s3" / bucket / "runs" / "p1"
    marker = tmp_path / "cache" / ".sft" / "export-pending" / "uid-p1.json"

    first = subprocess.Popen([sys.executable, "-m", "sft_trainer", "--config", str(cfg)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in first.stdout:
        if '"event": "progress"' in line:  # training: the output was proved writable before it
            proxy.refuse(10**9)  # S3 goes down until the export has given up
            break
    first.stdout.read()
    assert first.wait(timeout=300) == ExitCode.STORAGE_UNAVAILABLE, first.stderr.read()[-3000:]
    assert "a rerun of this run exports it without training" in term.read_text()
    assert json.loads(marker.read_text())["metrics"]["steps"] == 40
    assert (staging / "model" / "model.safetensors").exists()
    trained_log = (staging / "trainer_log.jsonl").read_bytes()

    proxy.stop_refusing()
    # The retry: the same SFTJob's next pod, or a new SFTJob (another run id) mounting the claim the operator
    # kept, with the same output (README "Object storage and tracking").
    again = subprocess.run([sys.executable, "-m", "sft_trainer", "--config", str(cfg)],
                           env={**env, "SFT_RUN_ID": rerun_id}, capture_output=True, text=True, timeout=300)
    proxy.close()
    assert again.returncode == 0, again.stderr[-3000:]
    assert "finished training before; its model awaits the export" in again.stderr
    assert (staging / "trainer_log.jsonl").read_bytes() == trained_log  # not one step trained again
    result = json.loads(term.read_text())
    assert result["outputUri"] == f"s3://{bucket}/runs/p1" and result["steps"] == 40
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket, Prefix="runs/p1/")["Contents"]}
    assert {"runs/p1/COMPLETE", "runs/p1/model/model.safetensors"} <= keys
    assert not list(marker.parent.glob("*.json"))  # exported: nothing awaits


def test_an_output_claim_that_is_not_mounted_fails_before_training(make_spec, tmp_path, monkeypatch):
    monkeypatch.setenv("SFT_PVC_ROOT", str(tmp_path / "pvc"))  # no claim "results" under it
    monkeypatch.setenv("SFT_TERMINATION_LOG", str(tmp_path / "termination-log"))
    cfg = write_config(make_spec(output={"destination": "pvc://results/run1"}), tmp_path / "config.json")
    assert entry.main(["--config", str(cfg)]) == ExitCode.NOT_FOUND
    assert (tmp_path / "termination-log").read_text().startswith(
        "pvc://results/run1 (output.destination): the claim 'results' is not mounted here")
    assert not (tmp_path / "pvc").exists()  # nothing written beside the claim's mount point
