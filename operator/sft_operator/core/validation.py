"""Offline validation of SFTJob manifests: one problem per line, each naming its field path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sft_contract import cel
from sft_operator.api.types import SFTJob


@dataclass(frozen=True)
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def _problem(error: dict[str, Any]) -> Problem:
    path = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    # Cross-field validators say which field they mean as "field.path: message".
    head, sep, rest = message.partition(": ")
    if sep and head and " " not in head and head[0].islower():
        path = f"{path}.{head}" if path else head
        message = rest
    if error["type"] == "extra_forbidden":
        message = "unknown field"
    return Problem(path or "<root>", message)


def problems_in(document: Any) -> list[Problem]:
    """The schema's problems (pydantic: types, bounds, patterns), then the CRD's CEL rules, as the API server
    reports both. A rule at a field that already has a problem adds nothing."""
    if not isinstance(document, dict):
        return [Problem("<root>", "expected a mapping (an SFTJob manifest)")]
    try:
        SFTJob.model_validate(document)
        found: list[Problem] = []
    except ValidationError as err:
        found = [_problem(e) for e in err.errors(include_url=False)]
    try:
        broken = cel.problems(SFTJob, document)
    except cel.RuleError:
        if found:  # a value of the wrong type, already reported
            return found
        raise
    for path, message in broken:
        if not any(p.path == path or p.path.startswith(path + ".") for p in found):
            found.append(Problem(path, message))
    return found


def load_documents(path: Path) -> list[Any]:
    """All YAML documents in a file (empty documents skipped)."""
    with path.open() as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def parse_sftjob(document: dict[str, Any]) -> SFTJob:
    return SFTJob.model_validate(document)
