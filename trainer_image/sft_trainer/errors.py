"""The one exception type that ends a run with a specific exit code from ``exit_codes``."""

from __future__ import annotations

from .exit_codes import ExitCode


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


class StorageUnavailable(TrainerError):
    def __init__(self, reason: str):
        super().__init__(ExitCode.STORAGE_UNAVAILABLE, reason)
