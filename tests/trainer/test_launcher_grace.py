"""SIGTERM to a multi-process run: the workers get the pod's grace period to save (torchrun alone gives
them 30 s), and the launcher exits 75 only when the checkpoint was really committed.

The save is made slow without touching the trainer: a ``sitecustomize`` module on the workers' PYTHONPATH
wraps ``checkpoint.save_file`` (the safetensors write) with a sleep after it, as a slow volume would."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.trainer

pytest.importorskip("torch")

from sft_trainer import checkpoint  # noqa: E402
from sft_contract.exit_codes import ExitCode  # noqa: E402
from sft_trainer.launch import KILLED, combined_exit, shutdown_timeout  # noqa: E402

from trainer_helpers import free_port, trainer_env, write_config  # noqa: E402

SLOW_SAVE = '''
import os, time
from sft_trainer import checkpoint
_save_file = checkpoint.save_file

def slow_save_file(*args, **kwargs):
    _save_file(*args, **kwargs)
    time.sleep(float(os.environ["SLOW_SAVE_SECONDS"]))  # the weights are written; the rest of the save waits

checkpoint.save_file = slow_save_file
'''


def sigterm_mid_training(make_spec, tmp_path, name: str, grace: str) -> tuple[int, str]:
    """A 2-process run whose checkpoint save takes 35 s, SIGTERM'd once training is under way."""
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SLOW_SAVE)
    spec = make_spec(hyperparameters={"maxSteps": 10_000, "perDeviceBatchSize": 2}, evaluation={"strategy": "no"},
                     dataset={"validationSplit": 0}, checkpointing={"strategy": "steps", "steps": 100_000},
                     output={"destination": str(tmp_path / name)})
    env = trainer_env(SLOW_SAVE_SECONDS="35", SFT_TERMINATION_GRACE_SECONDS=grace,
                      SFT_TERMINATION_LOG=str(tmp_path / f"{name}.termination-log"))
    env["PYTHONPATH"] = f"{hook}:{env['PYTHONPATH']}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sft_trainer.launch", "--nproc-per-node", "2", "--master-port", str(free_port()),
         "--config", str(write_config(spec, tmp_path / f"{name}.json"))],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # rank 0 reports progress: both ranks are training
        if '"event": "progress"' in line and json.loads(line)["step"] >= 2:
            proc.send_signal(signal.SIGTERM)  # what the kubelet sends the pod
            break
    proc.stdout.read()
    return proc.wait(timeout=240), proc.stderr.read()


def test_a_save_longer_than_30_s_completes_within_the_grace_period_and_exits_75(make_spec, tmp_path):
    code, stderr = sigterm_mid_training(make_spec, tmp_path, "saved", grace="120")
    assert code == ExitCode.INTERRUPTED, stderr[-3000:]
    saved = checkpoint.latest(tmp_path / "saved" / "checkpoints")
    assert saved is not None and (saved / checkpoint.MARKER).exists(), stderr[-3000:]
    assert checkpoint.load(saved)[2]["step"] >= 2  # whole: it loads
    assert "SIGTERM received at step" in (tmp_path / "saved.termination-log").read_text()


def test_a_save_cut_off_by_the_grace_period_is_not_reported_as_saved(make_spec, tmp_path):
    code, stderr = sigterm_mid_training(make_spec, tmp_path, "cut", grace="8")  # 3 s after SIGTERM: mid-save
    assert code == KILLED, stderr[-3000:]  # counted by the Job: the interruption lost the steps since the start
    assert checkpoint.latest(tmp_path / "cut" / "checkpoints") is None
    assert "not every worker saved and exited 75" in (tmp_path / "cut.termination-log").read_text()


def test_the_launcher_exit_code_is_75_only_when_every_worker_saved():
    assert combined_exit([75, 75]) == ExitCode.INTERRUPTED
    assert combined_exit([0, 75]) == ExitCode.INTERRUPTED  # rank 1 had finished; rank 0 saved (the export)
    assert combined_exit([0, 0]) == ExitCode.OK
    assert combined_exit([75, None]) == KILLED  # a worker that recorded nothing was killed mid-save
    assert combined_exit([75, -9]) == KILLED
    assert combined_exit([75, 65, 1]) == 65  # the first real failure, not the ranks stopped after it


def test_torchrun_gets_the_pods_grace_period_less_a_margin():
    assert shutdown_timeout("600") == 595
    assert shutdown_timeout("3") == 1
    assert shutdown_timeout(None) >= 24 * 3600  # unset: the pod's own grace period is the only bound
    with pytest.raises(SystemExit, match="SFT_TERMINATION_GRACE_SECONDS='ten'"):
        shutdown_timeout("ten")
