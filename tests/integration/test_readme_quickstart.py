"""The README's local-cluster quick start, run word for word: the bash block under "Try the operator
flow on the local cluster" is read from README.md and each line runs in order in bash, as root, in
the repository, with the environment the earlier lines exported. Each line must exit 0, the `-w`
watch must show the job Succeeded (it is stopped then, or after a timeout), and `kubectl wait` must
meet its condition. So the README and the product cannot drift apart.

It uses the machine's default dev cluster (~/.cache/sft-operator/dev-cluster), as a reader would,
so it runs after the session's own real node is down, and fails at once if a dev cluster is up."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import sft_devcluster as devcluster
from sft_devcluster import node as realnode
from support import REPO

pytestmark = [pytest.mark.cluster, pytest.mark.images, pytest.mark.after_real_node]

SECTION = "## Try the operator flow on the local cluster"
LINE_TIMEOUT = 1200  # setup and build-images are cached by the session, but a cold one may build
WATCH_TIMEOUT = 600


def quickstart_lines(readme: str) -> list[str]:
    """The commands of the first bash block after the quick start's heading (comment lines dropped)."""
    section = readme.split(SECTION, 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, f"README.md: no bash block under {SECTION!r}"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def run_line(line: str, env: dict[str, str], env_file: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """One line in bash; returns its result and the environment it leaves (for `export`)."""
    script = f"{line}\n__rc=$?\nenv -0 > {env_file}\nexit $__rc\n"
    proc = subprocess.run(["bash", "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=LINE_TIMEOUT, stdin=subprocess.DEVNULL)
    if env_file.exists() and env_file.stat().st_size:
        env = dict(item.split("=", 1) for item in env_file.read_text().split("\0") if "=" in item)
    return proc, env


def watch_until(line: str, env: dict[str, str], done: str) -> list[str]:
    """A `-w` watch: its lines until one says ``done``, or the timeout; then it is stopped."""
    proc = subprocess.Popen(["bash", "-c", f"exec {line}"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    seen: list[str] = []
    finished = threading.Event()

    def read() -> None:
        for out in proc.stdout:
            seen.append(out.rstrip("\n"))
            if done in out:
                finished.set()
        finished.set()

    threading.Thread(target=read, daemon=True).start()
    finished.wait(WATCH_TIMEOUT)
    proc.terminate()
    proc.wait(10)
    return seen


@pytest.fixture
def default_dev_cluster_free(request):
    """The session's real node is down (one per machine) and no dev cluster runs at the default place;
    `sftctl dev-cluster down` runs afterwards whatever happened."""
    holder = realnode.NodeLock.holder() if realnode.LOCK_FILE.exists() else {}
    if holder.get("pid") == os.getpid() and holder.get("stateDir"):  # this session's own real node
        devcluster.down(Path(holder["stateDir"]))
    if devcluster.status()["running"]:
        pytest.fail(f"a dev cluster is already up at {devcluster.default_state_dir()}: the quick start "
                    f"test runs the README's own `sftctl dev-cluster up` there; `sftctl dev-cluster down` first",
                    pytrace=False)
    # The README: to run the example again, remove .../models/tiny.
    models = devcluster.default_state_dir() / "volumes" / "default" / "models" / "tiny"
    shutil.rmtree(models, ignore_errors=True)
    yield
    devcluster.down()


def test_the_readme_quick_start_runs_word_for_word(default_dev_cluster_free, tmp_path):
    lines = quickstart_lines((REPO / "README.md").read_text())
    assert any(line.startswith("kubectl wait") for line in lines)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("KUBECONFIG", None)
    for number, line in enumerate(lines, 1):
        where = f"README.md quick start, line {number}: {line}"
        if re.search(r"\s-w(\s|$)", line.split("#")[0]):
            seen = watch_until(line, env, "Succeeded")
            assert any("Succeeded" in s for s in seen), f"{where}\nthe watch never showed Succeeded:\n" + "\n".join(seen)
            continue
        proc, env = run_line(line, env, tmp_path / "env")
        assert proc.returncode == 0, f"{where}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        if line.startswith("kubectl wait"):
            assert "condition met" in proc.stdout, f"{where}\n{proc.stdout}"
