"""Shared builders for unit tests."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
INVALID = sorted((ROOT / "tests" / "invalid").glob("*.yaml"))

MINIMAL: dict[str, Any] = {
    "apiVersion": "sft.dev/v1alpha1",
    "kind": "SFTJob",
    "metadata": {"name": "demo", "namespace": "team-a"},
    "spec": {
        "model": {"source": "Qwen/Qwen2.5-0.5B"},
        "dataset": {"train": {"source": "pvc://datasets/train.jsonl"}},
        "output": {"destination": "pvc://models/demo"},
    },
}


def manifest(**spec_overrides: Any) -> dict[str, Any]:
    doc = copy.deepcopy(MINIMAL)
    doc["spec"].update(spec_overrides)
    return doc


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def broken_field(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# field: "), f"{path} must start with '# field: <path>'"
    return first.removeprefix("# field: ").strip()
