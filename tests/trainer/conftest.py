"""Shared fixtures for the trainer tier: one set of tiny assets per session, spec builders, subprocess runs."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
for _path in ("contract", "trainer_image"):  # works without an editable install too
    if str(ROOT / _path) not in sys.path:
        sys.path.insert(0, str(ROOT / _path))
# One thread: tiny matrices gain nothing from more, and the test machine's cores are shared.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    from sft_trainer import tiny as tiny_assets

    return tiny_assets.generate(tmp_path_factory.mktemp("tiny") / "assets")


def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture
def make_spec(tiny, tmp_path):
    """A small, fast TrainingSpec dict on the tiny assets; keyword dicts are merged in."""

    def build(**extra: Any) -> dict[str, Any]:
        base = {
            "model": {"source": str(tiny / "model")},
            "dataset": {"train": {"source": str(tiny / "data" / "train.jsonl")}, "validationSplit": 0.1, "maxSeqLength": 128},
            "hyperparameters": {"learningRate": 3e-3, "numEpochs": 1, "perDeviceBatchSize": 8, "gradientAccumulationSteps": 1,
                                "warmupRatio": 0.05},
            "output": {"destination": str(tmp_path / "out")},
        }
        return deep_merge(base, extra)

    return build
