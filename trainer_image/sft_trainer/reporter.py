"""Progress out of the trainer: JSON lines on stdout and HTTP posts to the operator (rank 0 only).

Posting happens on a daemon thread that only ever sends the newest report, at most every
``SFT_PROGRESS_INTERVAL`` seconds (default 5, like Kubeflow's progress callback), plus a final post on
close. A slow, failing or absent endpoint never blocks or stops training: errors are logged and dropped.
The bearer token is re-read from its file for every post because projected tokens rotate.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable, TextIO

from sft_contract.messages import PROGRESS_PATH, ProgressReport

log = logging.getLogger(__name__)

DEFAULT_TOKEN_FILE = "/var/run/secrets/sft.dev/progress/token"
DEFAULT_INTERVAL_S = 5.0
POST_TIMEOUT_S = 5.0


def progress_url() -> str | None:
    """``$SFT_PROGRESS_URL``: the full endpoint, or a base URL to which the job's progress path is appended."""
    url = os.environ.get("SFT_PROGRESS_URL")
    if not url:
        return None
    ns, name = os.environ.get("SFT_JOB_NAMESPACE"), os.environ.get("SFT_JOB_NAME")
    if not url.rstrip("/").endswith("/progress") and ns and name:
        url = url.rstrip("/") + PROGRESS_PATH.format(namespace=ns, name=name)
    return url


def report_dict(report: ProgressReport) -> dict[str, Any]:
    return report.model_dump(mode="json", by_alias=True, exclude_none=True)


class ProgressReporter:
    """Non-blocking progress sink. ``report()`` is cheap; ``close()`` sends the final state."""

    def __init__(
        self,
        url: str | None = None,
        *,
        token_file: str | None = None,
        ca_file: str | None = None,
        interval_s: float | None = None,
        stdout: TextIO | None = sys.stdout,
        listener: Callable[[ProgressReport], None] | None = None,
    ):
        self.url = url
        self.token_file = token_file
        self.ca_file = ca_file
        self.interval_s = DEFAULT_INTERVAL_S if interval_s is None else interval_s
        self.stdout = stdout
        self.listener = listener
        self.posted = 0
        self.failures = 0
        self._pending: ProgressReport | None = None
        self._final = False
        self._closed = False
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        if url:
            self._thread = threading.Thread(target=self._run, name="sft-progress", daemon=True)
            self._thread.start()

    @classmethod
    def from_env(cls, **kwargs: Any) -> ProgressReporter:
        return cls(
            progress_url(),
            token_file=os.environ.get("SFT_PROGRESS_TOKEN_FILE", DEFAULT_TOKEN_FILE),
            ca_file=os.environ.get("SFT_PROGRESS_CA_FILE") or None,
            interval_s=float(os.environ.get("SFT_PROGRESS_INTERVAL", DEFAULT_INTERVAL_S)),
            **kwargs,
        )

    def report(self, report: ProgressReport, *, final: bool = False) -> None:
        if self.stdout is not None:
            self.stdout.write(json.dumps({"event": "progress", **report_dict(report)}) + "\n")
            self.stdout.flush()
        if self.listener is not None:
            self.listener(report)
        if self._thread is None:
            return
        with self._cv:
            self._pending = report
            self._final = self._final or final
            self._cv.notify()

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush the newest report (bounded by ``timeout_s``) and stop the thread."""
        if self._thread is None:
            return
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout_s)

    # ------------------------------------------------------------ the posting thread

    def _run(self) -> None:
        last = 0.0
        while True:
            with self._cv:
                while self._pending is None and not self._closed:
                    self._cv.wait()
                if self._pending is None and self._closed:
                    return
                wait = last + self.interval_s - time.monotonic()
                if wait > 0 and not (self._final or self._closed):
                    self._cv.wait(wait)  # coalesce: only the newest report is sent
                    continue
                report, self._pending = self._pending, None
                self._final = False
            self._post(report)
            last = time.monotonic()

    def _post(self, report: ProgressReport) -> None:
        body = json.dumps(report_dict(report)).encode()
        req = urllib.request.Request(self.url, data=body, method="POST", headers={"Content-Type": "application/json"})
        token = self._token()
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            ctx = ssl.create_default_context(cafile=self.ca_file) if self.url.startswith("https") else None
            with urllib.request.urlopen(req, timeout=POST_TIMEOUT_S, context=ctx) as resp:
                resp.read()
            self.posted += 1
        except (urllib.error.URLError, OSError, ssl.SSLError, ValueError) as e:
            self.failures += 1
            if self.failures in (1, 10) or self.failures % 100 == 0:  # don't flood the log
                log.warning("progress post to %s failed (%d so far): %s", self.url, self.failures, e)

    def _token(self) -> str | None:
        if not self.token_file:
            return None
        try:
            with open(self.token_file, encoding="utf-8") as f:
                return f.read().strip() or None
        except OSError:
            return None
