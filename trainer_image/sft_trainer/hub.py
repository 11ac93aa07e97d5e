"""Hub and network calls with retries.

huggingface_hub already retries one HTTP request a few times (about 23 s in all); an outage longer than
that would end the run as ModelLoadError/DataError (non-retriable) if nothing retried more. Here the
whole load is retried with exponential backoff while the failure is transient (connection refused or reset, timeouts, DNS,
HTTP 408/429/5xx anywhere in the exception chain); after the last attempt the run exits 69
(STORAGE_UNAVAILABLE), which the Job retries. Anything else (404, 401/403, a gated repo, offline mode, a
malformed file) is permanent and raised at once.

``SFT_HUB_ATTEMPTS`` (default 4) and ``SFT_HUB_RETRY_DELAY`` (seconds before the second attempt, doubled
each time, at most 60; default 5) tune it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Callable, TypeVar

from .errors import StorageUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT_NAMES = ("ConnectError", "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout", "TimeoutException",
                    "RemoteProtocolError", "ReadError", "NetworkError", "ChunkedEncodingError", "ProxyError")
_PERMANENT_NAMES = ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError", "RemoteEntryNotFoundError",
                    "DisabledRepoError", "OfflineModeIsEnabled")


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def is_transient(error: BaseException) -> bool:
    """True when a retry may succeed: a network failure or an overloaded server somewhere in the chain."""
    for e in _chain(error):
        name = type(e).__name__
        if name in _PERMANENT_NAMES:
            return False
        status = _status(e)
        if status is not None:
            return status in TRANSIENT_STATUS
        if name in _TRANSIENT_NAMES or isinstance(e, (ConnectionError, TimeoutError, socket.gaierror)):
            return True
    return False


def with_retries(load: Callable[[], T], what: str) -> T:
    """``load()``, retried while it fails transiently; then ``StorageUnavailable`` (exit 69) naming ``what``."""
    attempts = max(1, int(os.environ.get("SFT_HUB_ATTEMPTS", "4")))
    delay = float(os.environ.get("SFT_HUB_RETRY_DELAY", "5"))
    for attempt in range(1, attempts + 1):
        try:
            return load()
        except Exception as e:  # noqa: BLE001 - classified below; permanent errors go up unchanged
            if not is_transient(e):
                raise
            reason = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            if attempt == attempts:
                raise StorageUnavailable(f"{what}: still unreachable after {attempts} attempts ({reason}); the job retries") from None
            log.warning("%s: transient failure (%s); attempt %d of %d in %.0f s", what, reason, attempt + 1, attempts, delay)
            time.sleep(delay)
            delay = min(60.0, delay * 2)
    raise AssertionError("unreachable")
