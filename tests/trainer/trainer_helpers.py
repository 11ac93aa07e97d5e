"""Helpers shared by the trainer tests (imported by name: tests/ folders are not packages)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def write_config(spec: dict, path: Path) -> Path:
    path.write_text(json.dumps(spec))
    return path


def trainer_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "trainer_image"), str(ROOT / "contract"), str(ROOT / "operator"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def run_module(module: str, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], env=env or trainer_env(), capture_output=True, text=True, timeout=timeout
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines() if line]


def sigterm_once_at(step: int):
    """A progress listener that sends this process SIGTERM when the run reports ``step`` (once: an
    evaluation at the same step reports it again, and a second SIGTERM would kill the process)."""
    import signal

    sent = []

    def listener(report):
        if report.step == step and not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGTERM)

    return listener


def run_interrupted_at(spec: dict, step: int) -> None:
    """Run ``spec`` in this process until SIGTERM at ``step``: it saves a checkpoint and raises Interrupted."""
    import pytest

    from sft_trainer import train
    from sft_contract.spec import TrainingSpec
    from sft_trainer.errors import Interrupted

    with pytest.raises(Interrupted):
        train.run(TrainingSpec.model_validate(spec), stdout=None, listener=sigterm_once_at(step))
