"""Everything a running operator holds, in one place: settings, the client, the cache, the scheduler,
the status writer, the reconciler. Kopf's handlers find it in ``memo.ctx``. It only composes them: the
writer and the reconciler get the collaborators they use and know nothing of the context."""

from __future__ import annotations

from typing import Any

from sft_operator.core.render import RenderOptions
from sft_operator.runtime import metrics
from sft_operator.runtime.cache import Cache, Key
from sft_operator.runtime.client import KubeClient
from sft_operator.runtime.clock import SYSTEM_CLOCK, Clock
from sft_operator.runtime.events import post_event
from sft_operator.runtime.reconcile import Reconciler
from sft_operator.runtime.scheduler import Scheduler
from sft_operator.runtime.settings import OperatorSettings
from sft_operator.runtime.writer import StatusWriter


class Context:
    def __init__(self, settings: OperatorSettings, kube: KubeClient, render_options: RenderOptions, *,
                 cache: Cache | None = None, scheduler: Scheduler | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
        self.settings, self.kube = settings, kube
        self.cache = cache if cache is not None else Cache()
        self.scheduler = scheduler if scheduler is not None else Scheduler()
        # (kind, namespace or None) of the children's watches whose first list has not completed
        # (sft_operator.runtime.watch): the writer derives no status in such a scope.
        self.unlisted: set[tuple[str, str | None]] = set()
        # A finished job's last write kicks a reconcile (stop a failed run's Job, arm its TTL); through
        # self.kick, which tests replace to keep the reconciler out.
        self.writer = StatusWriter(kube, self.cache, self.scheduler, settings, unlisted=self.unlisted,
                                   on_finished=lambda key: self.kick(key), clock=clock)
        self.reconciler = Reconciler(kube, self.cache, self.scheduler, self.writer, render_options, clock=clock)

    @property
    def render_options(self) -> RenderOptions:
        return self.reconciler.render_options

    def set_render_options(self, options: RenderOptions) -> None:
        """New options (e.g. the progress CA was rotated): reconcile every unfinished job against them."""
        self.reconciler.set_render_options(options)

    def kick(self, key: Key, delay: float = 0.0) -> None:
        """Reconcile ``key``'s children (soon, once: repeated kicks share one run)."""
        self.reconciler.kick(key, delay)

    def forget(self, key: Key) -> None:
        self.cache.forget(key)
        self.scheduler.forget(key)
        self.writer.forget(key)
        metrics.remove_job(*key, deleted=True)
        metrics.set_phase_counts(self.cache.phase_counts())

    async def post_event(self, sftjob: dict[str, Any], kind: str, reason: str, message: str) -> None:
        """An Event on the SFTJob; losing one is logged, never fatal."""
        await post_event(self.kube, sftjob, kind, reason, message)

    async def close(self) -> None:
        await self.scheduler.close()
        await self.kube.close()
