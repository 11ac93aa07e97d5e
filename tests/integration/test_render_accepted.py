"""`sftctl render` output is what a real API server accepts (server-side dry run, strict fields)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("example", ["multi-node-lora.yaml", "llama2-7b-recipe.yaml", "general-mix-frozen.yaml",
                                     "s3-mlflow.yaml"])
def test_rendered_children_pass_server_side_validation(control_plane, namespace, example):
    """Including the fetch stage's init container, its podFailurePolicy rule (the Job API matches init
    containers by name) and the cache claim."""
    rendered = subprocess.run(
        [sys.executable, "-m", "sft_operator.cli.sftctl", "render", "-n", namespace, str(ROOT / "examples" / example),
         "--progress-url", "https://sft-operator.sft-system.svc:8443"],
        capture_output=True, text=True, check=True,
    ).stdout
    out = control_plane.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-", input=rendered, check=False)
    assert out.returncode == 0, out.stderr
    kinds = sorted(line.split("/")[0] for line in out.stdout.splitlines())
    assert kinds == ["configmap", "job.batch", "persistentvolumeclaim", "service"], out.stdout  # all fetch a model
