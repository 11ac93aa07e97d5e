"""The time the writer and the reconciler read: one object, so that tests can set it."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds for intervals (rate limits, back-off bookkeeping)."""
        ...

    def now(self) -> datetime:
        """The wall-clock time, timezone-aware UTC (compared with the API server's timestamps)."""
        ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.now(timezone.utc)


SYSTEM_CLOCK = SystemClock()
