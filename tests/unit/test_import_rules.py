"""The layers, as the imports show them (docs/architecture.md).

- ``sft_contract`` is at the bottom: the standard library, pydantic and the CEL library only.
- ``sft_operator.api`` imports only the contract; ``sft_operator.core`` only ``api`` and the contract.
- ``sft_operator.runtime`` and ``sft_operator.cli`` sit on top; nothing below imports them.
- Nothing in ``sft_operator`` imports ``sft_trainer``; the trainer never imports the operator.
- The development tools (``sft_devcluster``) and the product do not import each other.

Read from the source (every ``import``, at module level or inside a function), so a lazy import
counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "sft_contract": ROOT / "contract" / "sft_contract",
    "sft_operator": ROOT / "operator" / "sft_operator",
    "sft_trainer": ROOT / "trainer_image" / "sft_trainer",
    "sft_devcluster": ROOT / "tools" / "sft_devcluster",
}
OURS = tuple(PACKAGES)


def _module_name(package: str, path: Path) -> str:
    parts = [package, *path.relative_to(PACKAGES[package]).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(package: str, path: Path) -> set[str]:
    """Every module of ours that ``path`` imports, relative imports resolved."""
    module = _module_name(package, path).split(".")
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module if is_package else module[:-1]
                base = base[:len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
            out |= {f"{name}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return {m for m in out if m.split(".")[0] in OURS}


def _graph() -> dict[str, set[str]]:
    return {_module_name(pkg, path): _imports(pkg, path)
            for pkg, root in PACKAGES.items() for path in root.rglob("*.py")}


GRAPH = _graph()


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "sft_operator" and len(parts) > 1 and parts[1] in ("api", "core", "runtime", "cli"):
        return f"sft_operator.{parts[1]}"
    return parts[0] if parts[0] != "sft_operator" else module


def _is_module(name: str) -> bool:
    return name in GRAPH


# layer -> the layers of ours it may import (itself always allowed)
ALLOWED = {
    "sft_contract": set(),
    "sft_operator.api": {"sft_contract", "sft_operator"},
    "sft_operator.core": {"sft_contract", "sft_operator", "sft_operator.api"},
    "sft_operator.runtime": {"sft_contract", "sft_operator", "sft_operator.api", "sft_operator.core"},
    "sft_operator.cli": {"sft_contract", "sft_operator", "sft_operator.api", "sft_operator.core", "sft_operator.runtime"},
    "sft_trainer": {"sft_contract"},
    "sft_devcluster": set(),
}


def test_every_module_belongs_to_a_layer():
    """A new module at the top of ``sft_operator`` would sit outside every rule."""
    loose = sorted(m for m in GRAPH if m.startswith("sft_operator.") and _layer(m) not in ALLOWED)
    assert loose == ["sft_operator.__main__"], loose


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below_it(layer):
    broken = []
    for module, imported in GRAPH.items():
        if _layer(module) != layer:
            continue
        for name in imported:
            if not _is_module(name):  # `from pkg import Name`: the module itself was recorded too
                continue
            target = _layer(name)
            if target != layer and target not in ALLOWED[layer]:
                broken.append(f"{module} imports {name}")
    assert not broken, "\n".join(sorted(broken))


def test_the_operator_root_holds_only_the_version():
    """``sft_operator/__init__.py`` is importable from every layer, so it must not import any of them."""
    assert not GRAPH["sft_operator"]


def test_the_rule_reader_sees_a_lazy_cross_layer_import(tmp_path):
    """The checker itself: an import inside a function is found and resolved."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from sft_trainer import train\n    from ..runtime import writer\n")
    PACKAGES["sft_operator_probe"] = tmp_path
    try:
        found = _imports("sft_operator_probe", bad)
    finally:
        del PACKAGES["sft_operator_probe"]
    assert "sft_trainer.train" in found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles (strongly connected components of more than one module), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_of_the_operator_imports_itself_round_a_circle():
    """Lazy and TYPE_CHECKING imports count: a circle hidden by them is still a circle (issue #22:
    the context, the writer and the reconciler once imported each other)."""
    operator = {m: {i for i in imported if i.startswith("sft_operator.") and i != m}
                for m, imported in GRAPH.items() if m.startswith("sft_operator.")}
    assert _cycles(operator) == []


def test_the_circle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
