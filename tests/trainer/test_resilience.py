"""Failures a user meets: interruption and resume, SIGTERM, divergence, bad config, exit codes and messages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch")

from safetensors.torch import load_file  # noqa: E402

from sft_trainer import __main__ as entry  # noqa: E402
from sft_trainer import train  # noqa: E402
from sft_contract.spec import TrainingSpec  # noqa: E402
from sft_trainer.errors import DivergenceError, Interrupted  # noqa: E402
from sft_contract.exit_codes import ExitCode  # noqa: E402
from sft_trainer.stability import StabilityGuard  # noqa: E402

from trainer_helpers import read_log, trainer_env, write_config  # noqa: E402


def checkpoints(out):
    d = out / "checkpoints"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_resume_after_interruption_matches_an_uninterrupted_run(make_spec, tmp_path):
    spec = make_spec(
        hyperparameters={"maxSteps": 14, "gradientAccumulationSteps": 2},
        evaluation={"strategy": "no"},
        dataset={"validationSplit": 0},
        checkpointing={"strategy": "steps", "steps": 4, "keep": 2},
    )
    straight = {**spec, "output": {"destination": str(tmp_path / "straight")}}
    resumed = {**spec, "output": {"destination": str(tmp_path / "resumed")}}
    train.run(TrainingSpec.model_validate(straight), stdout=None)

    def interrupt_at_step_6(report):
        if report.step == 6:
            os.kill(os.getpid(), signal.SIGTERM)  # what the kubelet sends on eviction

    with pytest.raises(Interrupted) as e:
        train.run(TrainingSpec.model_validate(resumed), stdout=None, listener=interrupt_at_step_6)
    assert e.value.code == ExitCode.INTERRUPTED and "SIGTERM" in e.value.reason
    assert checkpoints(tmp_path / "resumed") == ["step-00000004", "step-00000006"]
    # A half-written checkpoint (a pod killed mid-save) must be ignored on resume.
    partial = tmp_path / "resumed" / "checkpoints" / "step-00000099"
    partial.mkdir()
    (partial / "trainable.safetensors").write_bytes(b"garbage")

    metrics = train.run(TrainingSpec.model_validate(resumed), stdout=None)
    assert metrics["steps"] == 14
    assert not partial.exists()
    steps = [r["step"] for r in read_log(tmp_path / "resumed") if "loss" in r]
    assert steps == list(range(1, 15))  # each step logged once: resume continued at step 7
    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def test_sigterm_saves_a_checkpoint_and_exits_75_through_the_launcher(make_spec, tmp_path):
    spec = make_spec(hyperparameters={"numEpochs": 20}, evaluation={"strategy": "no"}, dataset={"validationSplit": 0})
    cfg = write_config(spec, tmp_path / "config.json")
    term = tmp_path / "termination-log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sft_trainer.launch", "--config", str(cfg)],
        env=trainer_env(SFT_TERMINATION_LOG=str(term)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    for line in proc.stdout:  # wait until training is under way
        if '"event": "progress"' in line:
            break
    proc.send_signal(signal.SIGTERM)
    proc.stdout.read()
    assert proc.wait(timeout=60) == ExitCode.INTERRUPTED
    (saved,) = checkpoints(tmp_path / "out")
    assert (tmp_path / "out" / "checkpoints" / saved / "COMPLETE").exists()
    assert "SIGTERM" in term.read_text() and saved in term.read_text()


def test_divergence_stops_with_exit_66_naming_the_step_and_saves_nothing(make_spec, tiny, tmp_path, monkeypatch):
    # A base model with one Inf weight (a corrupt upload, an earlier run gone bad): the first loss is NaN.
    import shutil

    from safetensors.torch import save_file

    bad = tmp_path / "bad-model"
    shutil.copytree(tiny / "model", bad)
    weights = load_file(bad / "model.safetensors")
    weights["model.layers.2.mlp.up_proj.weight"][0, 0] = float("inf")
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    spec = make_spec(model={"source": str(bad)}, checkpointing={"strategy": "steps", "steps": 1})
    cfg = write_config(spec, tmp_path / "config.json")
    term = tmp_path / "termination-log"
    monkeypatch.setenv("SFT_TERMINATION_LOG", str(term))
    code = entry.main(["--config", str(cfg)])
    assert code == ExitCode.NAN_LOSS
    reason = term.read_text()
    assert "at step 1 " in reason and "lower the learning rate" in reason
    assert checkpoints(tmp_path / "out") == []  # nothing saved from the bad state


def test_guard_catches_nan_inf_and_spikes_before_the_step():
    guard = StabilityGuard(min_history=5)
    for step in range(1, 11):
        guard.check(step, 2.0 + 0.1 * (step % 3), 1.0, 1e-4)
    with pytest.raises(DivergenceError, match="step 11"):
        guard.check(11, float("nan"), 1.0, 1e-4)
    with pytest.raises(DivergenceError, match="gradient norm is inf at step 12"):
        guard.check(12, 2.0, float("inf"), 1e-4)
    with pytest.raises(DivergenceError, match="diverged at step 13"):
        guard.check(13, 40.0, 5.0, 1e-4)
    assert guard.check(14, 4.0, 5.0, 1e-4)  # twice the average is noise, not divergence


def test_malformed_row_exits_65_with_file_and_row(make_spec, tmp_path, monkeypatch):
    f = tmp_path / "train.jsonl"
    f.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    cfg = write_config(make_spec(dataset={"train": {"source": str(f)}, "validationSplit": 0}, evaluation={"strategy": "no"}),
                       tmp_path / "config.json")
    term = tmp_path / "termination-log"
    monkeypatch.setenv("SFT_TERMINATION_LOG", str(term))
    assert entry.main(["--config", str(cfg)]) == ExitCode.DATA_ERROR
    assert term.read_text().strip() == f"{f} row 2: missing field 'output'"


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"hyperparameters": {"learningRate": -1}}, "hyperparameters.learningRate"),
        ({"evaluation": {"strategy": "steps"}}, "steps"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_invalid_config_exits_64(make_spec, tmp_path, monkeypatch, change, needle):
    cfg = write_config(make_spec(**change), tmp_path / "config.json")
    term = tmp_path / "termination-log"
    monkeypatch.setenv("SFT_TERMINATION_LOG", str(term))
    assert entry.main(["--config", str(cfg)]) == ExitCode.INVALID_CONFIG
    assert needle in term.read_text()


def test_unloadable_model_exits_67(make_spec, tmp_path):
    (tmp_path / "empty-model").mkdir()
    cfg = write_config(make_spec(model={"source": str(tmp_path / "empty-model")}), tmp_path / "config.json")
    assert entry.main(["--config", str(cfg)]) == ExitCode.MODEL_LOAD_ERROR
