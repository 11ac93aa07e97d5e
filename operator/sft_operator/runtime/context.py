"""Everything a running operator holds, in one place: settings, the client, the cache, the scheduler,
the status writer. Kopf's handlers find it in ``memo.ctx``."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from sft_operator.core.render import RenderOptions
from sft_operator.runtime import metrics
from sft_operator.runtime.cache import Cache, Key
from sft_operator.runtime.client import ApiError, KubeClient
from sft_operator.runtime.scheduler import Scheduler
from sft_operator.runtime.settings import OperatorSettings
from sft_operator.runtime.writer import StatusWriter

log = logging.getLogger("sft_operator")
MANAGE_CONCURRENCY = 32


@dataclass
class Context:
    settings: OperatorSettings
    kube: KubeClient
    render_options: RenderOptions
    cache: Cache = field(default_factory=Cache)
    scheduler: Scheduler = field(default_factory=Scheduler)
    writer: StatusWriter = field(init=False)
    render_version: int = 0  # bumped when render_options change (a rotated CA): every ConfigMap is checked
    # Reconciles running at once: a burst of 1,000 new SFTJobs would otherwise hold 1,000 rendered sets of
    # children in memory while they queue for the API; the client's slots are the real limit anyway.
    manage_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MANAGE_CONCURRENCY))
    # (kind, namespace or None) of the children's watches whose first list has not completed
    # (sft_operator.runtime.watch): the writer derives no status in such a scope.
    unlisted: set[tuple[str, str | None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.writer = StatusWriter(self)

    def set_render_options(self, options: RenderOptions) -> None:
        """New options (e.g. the progress CA was rotated): reconcile every unfinished job against them."""
        self.render_options = options
        self.render_version += 1
        for key in list(self.cache.sftjobs):
            self.kick(key)

    def kick(self, key: Key, delay: float = 0.0) -> None:
        """Reconcile ``key``'s children (soon, once: repeated kicks share one run)."""
        from sft_operator.runtime.reconcile import manage  # manage needs the context; the context only schedules it

        self.scheduler.at(key, "manage", delay, lambda: manage(self, key))

    def forget(self, key: Key) -> None:
        self.cache.forget(key)
        self.scheduler.forget(key)
        self.writer.forget(key)
        metrics.remove_job(*key, deleted=True)
        metrics.set_phase_counts(self.cache.phase_counts())

    async def post_event(self, sftjob: dict[str, Any], kind: str, reason: str, message: str) -> None:
        """An Event on the SFTJob; losing one is logged, never fatal."""
        try:
            await self.kube.post_event(sftjob, kind, reason, message)
        except ApiError as exc:
            log.warning("Event %s on SFTJob %s/%s not posted: %s", reason, sftjob["metadata"].get("namespace"),
                        sftjob["metadata"].get("name"), exc)

    async def close(self) -> None:
        await self.scheduler.close()
        await self.kube.close()
