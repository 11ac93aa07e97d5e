"""When things run: one lock per SFTJob, named timers per SFTJob, back-off, and the background tasks.

The cache says what is; the scheduler says when the operator looks again (a coalesced status
write, the end of a grace period, a retry after a failed create, ttlSecondsAfterFinished).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from sft_operator.runtime.cache import Key

log = logging.getLogger("sft_operator.runtime.scheduler")
BACKOFF_FIRST_SECONDS = 5.0
BACKOFF_MAX_SECONDS = 300.0


def backoff_delay(failures: int) -> float:
    """5 s after the first failure, doubling to 5 minutes."""
    return min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * 2 ** max(0, failures - 1))


@dataclass
class Scheduler:
    locks: dict[tuple[Key, str], asyncio.Lock] = field(default_factory=dict)
    timers: dict[tuple[Key, str], tuple[float, asyncio.TimerHandle]] = field(default_factory=dict)
    failures: dict[tuple[Key, str], int] = field(default_factory=dict)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def lock(self, key: Key, what: str = "status") -> asyncio.Lock:
        """One lock per SFTJob and purpose: status writes never wait behind a slow child create."""
        lock = self.locks.get((key, what))
        if lock is None:
            lock = self.locks[(key, what)] = asyncio.Lock()
        return lock

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_name(), exc_info=task.exception())

    def at(self, key: Key, what: str, delay: float, run: Callable[[], Coroutine[Any, Any, Any]],
           *, earliest: bool = True) -> None:
        """Run ``run()`` after ``delay`` seconds, one timer per (key, what). With ``earliest`` an
        existing earlier timer stays; otherwise the new time replaces the old one."""
        loop = asyncio.get_running_loop()
        when = loop.time() + max(0.0, delay)
        existing = self.timers.get((key, what))
        if existing is not None:
            if earliest and existing[0] <= when:
                return
            existing[1].cancel()

        def fire() -> None:
            self.timers.pop((key, what), None)
            self.spawn(run(), name=f"{what} {key[0]}/{key[1]}")

        self.timers[(key, what)] = (when, loop.call_at(when, fire))

    def cancel(self, key: Key, what: str | None = None) -> None:
        for timer_key in [t for t in self.timers if t[0] == key and (what is None or t[1] == what)]:
            self.timers.pop(timer_key)[1].cancel()

    def failed(self, key: Key, what: str) -> float:
        """Count one more failure of ``what`` for ``key``; the delay before the next try."""
        self.failures[(key, what)] = self.failures.get((key, what), 0) + 1
        return backoff_delay(self.failures[(key, what)])

    def succeeded(self, key: Key, what: str) -> None:
        self.failures.pop((key, what), None)

    def forget(self, key: Key) -> None:
        self.cancel(key)
        for entry in [e for e in self.failures if e[0] == key]:
            del self.failures[entry]
        for entry in [e for e, lock in self.locks.items() if e[0] == key and not lock.locked()]:
            del self.locks[entry]

    async def close(self) -> None:
        for _, handle in self.timers.values():
            handle.cancel()
        self.timers.clear()
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
