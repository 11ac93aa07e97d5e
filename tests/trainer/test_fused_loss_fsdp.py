"""The fused LM-head loss under FSDP2 with the head sharded (2 processes, gloo, CPU): the loss and every
gradient are the unwrapped model's, with tied and untied embeddings, and the fused path really ran."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.trainer

pytest.importorskip("torch")

from trainer_helpers import free_port, trainer_env  # noqa: E402

WORKER = Path(__file__).with_name("fused_loss_fsdp_worker.py")


def test_under_fsdp_with_the_head_sharded_the_fused_loss_and_gradients_are_the_unwrapped_models(tmp_path):
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           str(WORKER), str(out)]
    result = subprocess.run(cmd, env=trainer_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    for name in ("llama", "llama-tied"):
        entry = report[name]
        fused, unfused = entry["fused"], entry["unfused"]
        assert fused["head_sharded"] and fused["fused_calls"] == 1 and unfused["fused_calls"] == 0, name
        assert fused["loss"] == pytest.approx(entry["reference_loss"], rel=1e-5), name
        assert unfused["loss"] == pytest.approx(entry["reference_loss"], rel=1e-5), name
        assert fused["worst_relative_grad_error"] < 1e-4, (name, fused)
        assert unfused["worst_relative_grad_error"] < 1e-4, (name, unfused)
