"""The trainer's exit codes: the single table shared by the trainer and the operator.

The renderer turns ``NON_RETRIABLE`` into the Job's podFailurePolicy (fail the job at once) and
the operator maps a terminated container's exit code to a status reason with ``REASONS``.
Values follow sysexits(3) where one fits, so they never collide with Python's 1 or a signal's 128+N.
"""

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    INVALID_CONFIG = 64  # EX_USAGE: the config file failed validation
    DATA_ERROR = 65  # EX_DATAERR: a malformed row or unreadable dataset file
    NAN_LOSS = 66  # loss or gradient norm went NaN/Inf, or the loss diverged
    MODEL_LOAD_ERROR = 67  # the model or tokenizer could not be loaded
    STORAGE_UNAVAILABLE = 69  # EX_UNAVAILABLE: object storage or the hub unreachable after retries; a retry resumes
    INTERRUPTED = 75  # EX_TEMPFAIL: SIGTERM; a checkpoint was saved, retrying resumes from it


NON_RETRIABLE: tuple[ExitCode, ...] = (
    ExitCode.INVALID_CONFIG,
    ExitCode.DATA_ERROR,
    ExitCode.NAN_LOSS,
    ExitCode.MODEL_LOAD_ERROR,
)

# Status reasons (one CamelCase word, per the API conventions) for each trainer exit code.
REASONS: dict[int, str] = {
    ExitCode.INVALID_CONFIG: "InvalidConfig",
    ExitCode.DATA_ERROR: "DataError",
    ExitCode.NAN_LOSS: "NaNLoss",
    ExitCode.MODEL_LOAD_ERROR: "ModelLoadError",
    ExitCode.STORAGE_UNAVAILABLE: "StorageUnavailable",
    ExitCode.INTERRUPTED: "Interrupted",
}

DEFAULT_TERMINATION_LOG = "/dev/termination-log"
