"""The evaluation gate table that ``sftctl run`` (the trainer) and ``sftctl status`` (the operator's CLI) print.

Both sides show the same table and neither may import the other, so it lives in the contract. rich (a
dependency of both) is imported only when a table is drawn: the contract stays importable with pydantic alone."""

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


def gate_table(evaluation: dict[str, Any]):
    """The gates as a rich Table: the base and tuned model's values, the bounds, the verdict."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"evaluation gates: {verdict(evaluation)}", title_justify="left")
    for column in COLUMNS:
        table.add_column(column)
    for cells, passed, message in rows(evaluation):
        word, rest = result_cell(passed, message)
        table.add_row(*cells, Text.assemble((word, {True: "green", False: "red"}.get(passed, "")), rest))
    return table
