"""The operator as tests and benchmarks run it: `python -m sft_operator` in a subprocess with its
own free ports, against a dev cluster's kubeconfig. A development tool (never in an image)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from .processes import free_port
from .state import REPO_ROOT


class OperatorProcess:
    """One operator subprocess; `start()` may be called again after `kill()` (crash tests)."""

    def __init__(self, kubeconfig: Path, log_path: Path, args: list[str] = (), env: dict[str, str] | None = None,
                 source: Path | None = None):
        """``source``: another checkout to run the operator from (e.g. a benchmark's "before")."""
        self.ports = {"metrics": free_port(), "health": free_port(), "progress": free_port()}
        self.log_path = Path(log_path)
        self.args = list(args)
        self.source = Path(source) if source else REPO_ROOT
        # Settings come from the flags and env given here only, never from the developer's shell.
        base = {k: v for k, v in os.environ.items() if not k.startswith("SFT_") and k != "KUBERNETES_SERVICE_HOST"}
        paths = [str(self.source / "contract"), str(self.source / "operator"), str(self.source / "trainer_image"), base.get("PYTHONPATH", "")]
        self.env = {**base, "PYTHONUNBUFFERED": "1", "KUBECONFIG": str(kubeconfig),
                    "PYTHONPATH": os.pathsep.join(p for p in paths if p), **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @classmethod
    def plaintext(cls, kubeconfig: Path, log_path: Path, namespaces: str | list[str], *extra: str,
                  source: Path | None = None) -> OperatorProcess:
        """Watching the given namespace(s), progress over plain HTTP on loopback (local development mode)."""
        op = cls(kubeconfig, log_path, source=source)
        watched = [namespaces] if isinstance(namespaces, str) else list(namespaces)
        op.args = [
            *[a for ns in watched for a in ("-n", ns)], "--log-format", "plain", "--progress-allow-plaintext",
            "--metrics-port", str(op.ports["metrics"]), "--health-port", str(op.ports["health"]),
            "--progress-port", str(op.ports["progress"]), "--progress-url", op.progress_url, *extra,
        ]
        return op

    @property
    def progress_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['progress']}"

    @property
    def command(self) -> list[str]:
        package = self.source / "operator" / "sft_operator"
        # An --operator-source checkout may have no sft_operator/__main__.py.
        module = "sft_operator" if (package / "__main__.py").exists() else "sft_operator.runtime.main"
        return [sys.executable, "-m", module, *self.args]

    def start(self, wait: bool = True, timeout: float = 40) -> None:
        with open(self.log_path, "a") as log:
            log.write(f"\n===== start {self.starts} =====\n")
            log.flush()
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         cwd=self.source, start_new_session=True)
        self.starts += 1
        if wait:
            self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 40) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc and self.proc.poll() is None, f"operator exited:\n{self.log_tail()}"
            if self.health() == 200:
                return
            time.sleep(0.2)
        raise AssertionError(f"operator not healthy after {timeout}s:\n{self.log_tail()}")

    def health(self) -> int | None:
        """The liveness endpoint's HTTP status (None when it does not answer)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['health']}/healthz", timeout=2) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def metrics(self) -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['metrics']}/metrics", timeout=5) as resp:
                return resp.read().decode()
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])
