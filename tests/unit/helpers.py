"""Shared paths and readers for unit tests; the builders are tests/builders.py (re-exported here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from builders import MINIMAL, manifest  # noqa: F401  (re-exported: the one set of builders)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
INVALID = sorted((ROOT / "tests" / "invalid").glob("*.yaml"))


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def broken_field(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# field: "), f"{path} must start with '# field: <path>'"
    return first.removeprefix("# field: ").strip()
