"""The one exception type that ends a run with a specific exit code from ``exit_codes``."""

from __future__ import annotations

import contextlib
import signal

from sft_contract.exit_codes import ExitCode


class TrainerError(Exception):
    """A failure with a known exit code and a one-line reason for the termination log."""

    def __init__(self, code: ExitCode, reason: str):
        super().__init__(reason)
        self.code = ExitCode(code)
        self.reason = " ".join(reason.split())  # one line, as the termination message expects


class DataError(TrainerError):
    def __init__(self, reason: str):
        super().__init__(ExitCode.DATA_ERROR, reason)


class ConfigError(TrainerError):
    def __init__(self, reason: str):
        super().__init__(ExitCode.INVALID_CONFIG, reason)


class ModelLoadError(TrainerError):
    def __init__(self, reason: str):
        super().__init__(ExitCode.MODEL_LOAD_ERROR, reason)


class DivergenceError(TrainerError):
    def __init__(self, reason: str):
        super().__init__(ExitCode.NAN_LOSS, reason)


class Interrupted(TrainerError):
    def __init__(self, reason: str):
        super().__init__(ExitCode.INTERRUPTED, reason)


class NotFound(TrainerError):
    def __init__(self, reason: str):
        super().__init__(ExitCode.NOT_FOUND, reason)


class AccessDenied(TrainerError):
    def __init__(self, reason: str):
        super().__init__(ExitCode.ACCESS_DENIED, reason)


class StorageUnavailable(TrainerError):
    def __init__(self, reason: str):
        super().__init__(ExitCode.STORAGE_UNAVAILABLE, reason)


class CacheTooSmall(TrainerError):
    def __init__(self, reason: str):
        super().__init__(ExitCode.CACHE_TOO_SMALL, reason)


class EvaluationFailed(TrainerError):
    def __init__(self, reason: str):
        super().__init__(ExitCode.EVALUATION_FAILED, reason)


class _Terminated(BaseException):
    """SIGTERM, raised where the main thread happens to be. A BaseException, like KeyboardInterrupt, because
    libraries catch ``Exception`` around their I/O: botocore retries a request that raised one."""


@contextlib.contextmanager
def sigterm_interrupts(what: str):
    """SIGTERM (a pod deleted, evicted, preempted) ends the block as ``Interrupted`` (exit 75), which the Job
    retries without counting it; the retry resumes the transfer. Outside the main thread: no change."""

    def handle(signum, frame):
        raise _Terminated()

    try:
        old = signal.signal(signal.SIGTERM, handle)
    except ValueError:
        yield
        return
    try:
        yield
    except _Terminated:
        raise Interrupted(f"SIGTERM during {what}; a retry resumes it") from None
    finally:
        signal.signal(signal.SIGTERM, old)
