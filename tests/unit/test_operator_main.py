"""Start-up and liveness of `sft-operator`: a configuration that cannot work stops the process with
the reason; a Kubernetes call that stops getting through fails liveness."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import kopf
import pytest

from sft_operator.runtime.settings import OperatorSettings
from support import REPO


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--progress-tls-cert and --progress-tls-key"),
        (["--progress-tls-cert", "/nonexistent/tls.crt", "--progress-tls-key", "/nonexistent/tls.key"],
         "/nonexistent/tls.crt: not a readable file"),
        (["--progress-allow-plaintext", "--progress-ca-file", "/nonexistent/ca.crt"], "ca.crt: not a readable file"),
    ],
    ids=["no-tls", "missing-cert", "missing-ca"],
)
def test_a_configuration_that_cannot_work_exits_at_once_with_the_reason(args, message):
    env = {"PATH": "/usr/bin:/bin", "KUBECONFIG": "/nonexistent/kubeconfig",
           "PYTHONPATH": f"{REPO / 'contract'}:{REPO / 'operator'}:{REPO / 'trainer_image'}"}
    out = subprocess.run([sys.executable, "-m", "sft_operator", *args], capture_output=True, text=True,
                         timeout=60, env=env, cwd=REPO)
    assert out.returncode != 0
    assert message in out.stderr


def test_liveness_fails_when_kubernetes_calls_stop_finishing():
    from sft_operator.runtime.handlers import api_calls_flow

    kube = SimpleNamespace(stalled_seconds=lambda: 12.0)
    memo = SimpleNamespace(get=lambda key: SimpleNamespace(kube=kube, settings=OperatorSettings(stuck_seconds=60)))
    assert api_calls_flow(memo=memo) == 12.0
    kube.stalled_seconds = lambda: 61.0
    with pytest.raises(kopf.PermanentError, match="waited 61s with none finishing"):
        api_calls_flow(memo=memo)
