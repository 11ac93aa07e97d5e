"""The evaluation gate table as ``sftctl run`` (the trainer) and ``sftctl status`` (the operator's CLI)
print it: plain rows here, each side draws them with rich."""

from __future__ import annotations

from typing import Any

COLUMNS = ("gate", "better", "base", "tuned", "threshold", "minChange", "onFail", "result")


def number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def verdict(evaluation: dict[str, Any]) -> str:
    """The table's title word: passed, FAILED or not judged."""
    return {True: "passed", False: "FAILED", None: "not judged"}[evaluation.get("passed")]


def rows(evaluation: dict[str, Any]) -> list[tuple[list[str], bool | None, str]]:
    """One row per gate: the cells of ``COLUMNS`` but the last, whether the gate passed (None: not judged)
    and its message; ``result_cell`` makes the last cell of the last two, which the caller colours."""
    out = []
    for gate in evaluation.get("gates", []):
        cells = [gate["metric"], gate["direction"], number(gate.get("base")), number(gate.get("tuned")),
                 number(gate.get("threshold")), number(gate.get("minChange")), gate.get("onFail", "Fail")]
        out.append((cells, gate.get("passed"), str(gate.get("message", ""))))
    return out


def result_cell(passed: bool | None, message: str) -> tuple[str, str]:
    """(the word, the rest) of the result cell: ``("passed", "")``, ``("failed", ": why")`` or ``("-", "")``."""
    if passed:
        return "passed", ""
    if passed is False:
        return "failed", f": {message}"
    return "-", ""
