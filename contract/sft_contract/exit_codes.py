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
    NOT_FOUND = 68  # a bucket, object, prefix, hub repo or revision does not exist (named in the message)
    STORAGE_UNAVAILABLE = 69  # EX_UNAVAILABLE: object storage or the hub unreachable after retries; a retry resumes
    CACHE_TOO_SMALL = 73  # EX_CANTCREAT: the fetch cache volume has less free space than the download needs
    INTERRUPTED = 75  # EX_TEMPFAIL: SIGTERM; a checkpoint was saved, retrying resumes from it
    PEER_LOST = 76  # EX_PROTOCOL: another rank died or a collective timed out; the group restarts from a checkpoint
    ACCESS_DENIED = 77  # EX_NOPERM: credentials missing, wrong or not allowed to read/write the object (named)
    SUPERSEDED = 79  # another pod of this run took its output destination over (a partition's replacement); stopped unwritten
    EVALUATION_FAILED = 80  # a gate with onFail Fail failed: the model was written under rejected/ (no sysexits code fits)


NON_RETRIABLE: tuple[ExitCode, ...] = (
    ExitCode.INVALID_CONFIG,
    ExitCode.DATA_ERROR,
    ExitCode.NAN_LOSS,
    ExitCode.MODEL_LOAD_ERROR,
    ExitCode.NOT_FOUND,
    ExitCode.CACHE_TOO_SMALL,
    ExitCode.ACCESS_DENIED,
    ExitCode.EVALUATION_FAILED,
)

# Retried without counting against backoffLimit: nothing was wrong with this pod. A rank that loses a peer
# (its pod evicted, its node gone, its process killed) cannot go on, and the static rendezvous only
# re-forms when every rank's pod is new, so the survivors exit too and the whole group restarts.
UNCOUNTED: tuple[ExitCode, ...] = (ExitCode.INTERRUPTED, ExitCode.PEER_LOST, ExitCode.SUPERSEDED)

# Status reasons (one CamelCase word, per the API conventions) for each trainer exit code.
REASONS: dict[int, str] = {
    ExitCode.INVALID_CONFIG: "InvalidConfig",
    ExitCode.DATA_ERROR: "DataError",
    ExitCode.NAN_LOSS: "NaNLoss",
    ExitCode.MODEL_LOAD_ERROR: "ModelLoadError",
    ExitCode.NOT_FOUND: "NotFound",
    ExitCode.STORAGE_UNAVAILABLE: "StorageUnavailable",
    ExitCode.CACHE_TOO_SMALL: "CacheTooSmall",
    ExitCode.INTERRUPTED: "Interrupted",
    ExitCode.PEER_LOST: "PeerLost",
    ExitCode.ACCESS_DENIED: "AccessDenied",
    ExitCode.SUPERSEDED: "Superseded",
    ExitCode.EVALUATION_FAILED: "EvaluationFailed",
}

DEFAULT_TERMINATION_LOG = "/dev/termination-log"
