"""Every program that the dev cluster and the tests run on the host is named in scripts/host-tools.sh,
the one list that setup installs. The command names are read from the code itself (its subprocess
calls, the helpers that wrap them, and `shutil.which` look-ups), so a new `nft` call with no install
step fails here instead of on a fresh machine."""

from __future__ import annotations

import ast
import itertools
import subprocess
from pathlib import Path

from tests.support import REPO

SCANNED = ("tools", "tests")
SUBPROCESS_CALLS = {"run", "Popen", "check_output", "check_call", "call"}


def listed_tools() -> set[str]:
    out = subprocess.run(["bash", str(REPO / "scripts" / "host-tools.sh"), "--list"], capture_output=True,
                         text=True, check=True).stdout
    return {Path(line.split()[0]).name for line in out.splitlines() if line.strip()}


def _call_name(call: ast.Call) -> str | None:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


def _is_subprocess_call(call: ast.Call) -> bool:
    func = call.func
    return (isinstance(func, ast.Attribute) and func.attr in SUBPROCESS_CALLS
            and isinstance(func.value, ast.Name) and func.value.id == "subprocess")


def _is_which(call: ast.Call) -> bool:
    func = call.func
    return isinstance(func, ast.Attribute) and func.attr == "which" and getattr(func.value, "id", None) == "shutil"


class _Scope(ast.NodeVisitor):
    """Collects, per module, the values a name can take from `for x in (<constants>)` loops and
    `x = [<constants>, ...]` assignments, so `_run(binary, ...)` inside such a loop resolves."""

    def __init__(self) -> None:
        self.bindings: dict[str, list[ast.expr]] = {}

    def visit_For(self, node: ast.For) -> None:
        if isinstance(node.target, ast.Name) and isinstance(node.iter, (ast.Tuple, ast.List)):
            self.bindings.setdefault(node.target.id, []).extend(node.iter.elts)
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        for target in node.targets:
            if isinstance(target, ast.Name):
                self.bindings.setdefault(target.id, []).append(node.value)
        self.generic_visit(node)


def _resolve(expr: ast.expr, bindings: dict[str, list[ast.expr]], depth: int = 0) -> set[str]:
    """The command names an argument can stand for; empty when it is not a name known in the code
    (a path built at run time such as the cache's own binaries, sys.executable)."""
    if depth > 4:
        return set()
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
        return {expr.value}
    if isinstance(expr, (ast.List, ast.Tuple)) and expr.elts and not isinstance(expr.elts[0], ast.Starred):
        return _resolve(expr.elts[0], bindings, depth + 1)
    if isinstance(expr, ast.Name):
        return set().union(*(_resolve(v, bindings, depth + 1) for v in bindings.get(expr.id, [])))
    if isinstance(expr, ast.JoinedStr):
        parts = []
        for value in expr.values:
            if isinstance(value, ast.Constant):
                parts.append({value.value})
            elif isinstance(value, ast.FormattedValue):
                parts.append(_resolve(value.value, bindings, depth + 1))
        return {"".join(combo) for combo in itertools.product(*parts)} if all(parts) else set()
    return set()


def _wrappers(tree: ast.Module) -> set[str]:
    """Functions that hand their first argument (or their *args) to subprocess as the command."""
    found = set()
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef):
            continue
        params = {a.arg for a in fn.args.args[:1]} | ({fn.args.vararg.arg} if fn.args.vararg else set())
        for call in ast.walk(fn):
            if isinstance(call, ast.Call) and _is_subprocess_call(call) and call.args:
                first = call.args[0]
                head = first.elts[0] if isinstance(first, (ast.List, ast.Tuple)) and first.elts else first
                head = head.value if isinstance(head, ast.Starred) else head
                if isinstance(head, ast.Name) and head.id in params:
                    found.add(fn.name)
    return found


def commands_in(files: list[Path], root: Path = REPO) -> dict[str, set[str]]:
    """command name -> the files that run it."""
    trees = {path: ast.parse(path.read_text(), str(path)) for path in files}
    wrappers = set().union(*(_wrappers(tree) for tree in trees.values()))
    used: dict[str, set[str]] = {}
    for path, tree in trees.items():
        scope = _Scope()
        scope.visit(tree)
        for call in ast.walk(tree):
            if not isinstance(call, ast.Call) or not call.args:
                continue
            if _is_subprocess_call(call) or _is_which(call) or _call_name(call) in wrappers:
                for name in _resolve(call.args[0], scope.bindings):
                    if name and "/" not in name and " " not in name:
                        used.setdefault(name, set()).add(str(path.relative_to(root)))
    return used


def scanned_files() -> list[Path]:
    return sorted(p for top in SCANNED for p in (REPO / top).rglob("*.py") if "__pycache__" not in p.parts)


def test_every_host_program_that_tools_and_tests_run_is_in_the_host_tools_list():
    used = commands_in(scanned_files())
    unlisted = {name: sorted(files) for name, files in used.items() if name not in listed_tools()}
    assert not unlisted, (f"run on the host but not in scripts/host-tools.sh (add each with its Debian package): "
                          f"{unlisted}")


def test_the_scan_finds_commands_behind_wrappers_loops_and_which(tmp_path):
    # The shapes the dev cluster uses: a *cmd wrapper, a loop over binaries, an f-string, shutil.which.
    (tmp_path / "m.py").write_text(
        "import shutil, subprocess\n"
        "def _run(*cmd, check=True):\n    return subprocess.run(cmd)\n"
        "def lines(*cmd):\n    return subprocess.run(cmd, capture_output=True)\n"
        "_run('nft', 'list', 'tables')\n"
        "for binary in ('iptables', 'ip6tables'):\n    lines(f'{binary}-save')\n"
        "shutil.which('mmdebstrap')\n"
        "subprocess.Popen(['podman', 'build'])\n"
        "import sys\nsubprocess.run([sys.executable, '-m', 'x'])\n")
    assert set(commands_in([tmp_path / "m.py"], root=tmp_path)) == {"nft", "iptables-save", "ip6tables-save", "mmdebstrap", "podman"}



def test_the_list_names_what_a_fresh_machine_lacks_with_the_package_that_brings_it():
    out = subprocess.run(["bash", str(REPO / "scripts" / "host-tools.sh"), "--list"], capture_output=True,
                         text=True, check=True).stdout
    packages = dict(line.split() for line in out.splitlines())
    assert packages["nft"] == "nftables" and packages["iptables"] == "iptables"
    assert packages["runc"] == "runc" and packages["podman"] == "podman"


def test_dev_cluster_up_names_each_missing_tool_with_its_package(tmp_path):
    # A PATH with none of the tools (tmp_path holds nothing; /usr/sbin and /sbin are always looked in, as the
    # kubelet does): what `up` reports before starting anything.
    from sft_devcluster import node

    lacking = dict(node.missing_host_tools(str(tmp_path)))
    assert lacking["podman"] == "podman" and lacking["mmdebstrap"] == "mmdebstrap" and lacking["openssl"] == "openssl"
    assert "hadolint" not in lacking  # installed by setup.sh's pip step, not looked for on PATH
