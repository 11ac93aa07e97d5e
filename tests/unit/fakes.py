"""Fakes for the writer's and the reconciler's collaborators: an in-memory API server that can be told to
fail, a clock the test sets, and a scheduler whose timers fire only when the test moves that clock.
With them a test of back-off or of a write window takes no wall-clock time and cannot be flaky."""

from __future__ import annotations

import asyncio
import copy
import itertools
from collections.abc import Callable, Coroutine
from datetime import datetime, timedelta, timezone
from typing import Any

from sft_operator.core.render import RenderOptions
from sft_operator.runtime.cache import Cache, Key
from sft_operator.runtime.client import ApiError
from sft_operator.runtime.reconcile import Reconciler
from sft_operator.runtime.scheduler import Scheduler
from sft_operator.runtime.settings import OperatorSettings
from sft_operator.runtime.writer import StatusWriter

START = datetime(2026, 12, 7, 10, 0, 0, tzinfo=timezone.utc)


class FakeClock:
    """Starts at START (wall) and 1000.0 (monotonic); moves only when told."""

    def __init__(self, start: datetime = START) -> None:
        self.start, self.seconds = start, 0.0

    def monotonic(self) -> float:
        return 1000.0 + self.seconds

    def now(self) -> datetime:
        return self.start + timedelta(seconds=self.seconds)

    def stamp(self, seconds: float = 0.0) -> str:
        """The API server's timestamp for ``seconds`` from now."""
        return (self.now() + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


class ManualScheduler(Scheduler):
    """The real scheduler's locks, back-off and background tasks; its timers wait for ``advance``."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock
        self.due: dict[tuple[Key, str], tuple[float, Callable[[], Coroutine[Any, Any, Any]]]] = {}

    def at(self, key: Key, what: str, delay: float, run: Callable[[], Coroutine[Any, Any, Any]],
           *, earliest: bool = True) -> None:
        when = self.clock.monotonic() + max(0.0, delay)
        existing = self.due.get((key, what))
        if existing is not None and earliest and existing[0] <= when:
            return
        self.due[(key, what)] = (when, run)

    def cancel(self, key: Key, what: str | None = None) -> None:
        for timer in [t for t in self.due if t[0] == key and (what is None or t[1] == what)]:
            del self.due[timer]

    def delay(self, key: Key, what: str) -> float | None:
        """Seconds until ``what`` runs for ``key``; None when nothing is scheduled."""
        entry = self.due.get((key, what))
        return None if entry is None else entry[0] - self.clock.monotonic()

    async def advance(self, seconds: float) -> None:
        """Move the clock, running each timer that comes due at its own time, in order."""
        end = self.clock.seconds + seconds
        while True:
            await settle()
            ready = sorted((when, timer) for timer, (when, _) in self.due.items() if when <= 1000.0 + end)
            if not ready:
                break
            when, timer = ready[0]
            self.clock.seconds = max(self.clock.seconds, when - 1000.0)
            _, run = self.due.pop(timer)
            await run()
        self.clock.seconds = end


async def settle() -> None:
    """Let spawned tasks (Events, advice) run to their end: the fakes never wait on anything."""
    for _ in range(5):
        await asyncio.sleep(0)


class FakeKube:
    """Creates, reads and patches objects in memory like the API server (uids, 409 on a taken name).
    ``fail(method, *errors, kind=...)`` makes the next calls of ``method`` (for objects of ``kind``, or any)
    raise those ApiErrors, one per call."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.patches: list[tuple[str, str, dict[str, Any]]] = []
        self.writes: list[dict[str, Any]] = []
        self.write_times: list[float] = []
        self.events: list[tuple[str, str, str]] = []
        self.gets: list[tuple[str, str]] = []
        self.creates: list[tuple[str, str]] = []
        self.uids = itertools.count(1)
        self.failures: dict[tuple[str, str | None], list[ApiError]] = {}
        self.clock: FakeClock | None = None

    def fail(self, method: str, *errors: ApiError, kind: str | None = None) -> None:
        self.failures.setdefault((method, kind), []).extend(errors)

    def _maybe_fail(self, method: str, kind: str | None = None) -> None:
        for which in ((method, kind), (method, None)):
            if self.failures.get(which):
                raise self.failures[which].pop(0)

    async def create(self, obj: dict[str, Any], **_: Any) -> dict[str, Any]:
        meta = obj["metadata"]
        self.creates.append((obj["kind"], meta["name"]))
        self._maybe_fail("create", obj["kind"])
        where = (obj["kind"], meta.get("namespace", "team-a"), meta["name"])
        if where in self.objects:
            raise ApiError(409, "AlreadyExists", f"{obj['kind']} {meta['name']} already exists")
        made = copy.deepcopy(obj)
        made["metadata"].update(namespace=where[1], uid=f"{obj['kind'].lower()}-{next(self.uids)}", resourceVersion="1",
                                creationTimestamp="2026-12-07T10:00:00Z")
        self.objects[where] = made
        return copy.deepcopy(made)

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        self.gets.append((kind, name))
        self._maybe_fail("get", kind)
        if (kind, namespace, name) not in self.objects:
            raise ApiError(404, "NotFound", f"{kind} {name} not found")
        return copy.deepcopy(self.objects[(kind, namespace, name)])

    async def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.patches.append((kind, name, patch))
        self._maybe_fail("patch", kind)
        obj = self.objects[(kind, namespace, name)]
        obj.setdefault("spec", {}).update(patch.get("spec") or {})
        for k, v in (patch.get("data") or {}).items():  # a merge patch: null removes the key
            if v is None:
                obj["data"].pop(k, None)
            else:
                obj["data"][k] = v
        meta_patch = patch.get("metadata") or {}
        for field in ("annotations", "labels"):
            if field in meta_patch:
                obj["metadata"][field] = {**(obj["metadata"].get(field) or {}), **meta_patch[field]}
        if "ownerReferences" in meta_patch:
            obj["metadata"]["ownerReferences"] = meta_patch["ownerReferences"]
        self.bump(obj)
        return copy.deepcopy(obj)

    def bump(self, obj: dict[str, Any]) -> None:
        obj["metadata"]["resourceVersion"] = str(int(obj["metadata"]["resourceVersion"]) + 1)

    def metadata_event(self, kind: str, name: str) -> dict[str, Any]:
        """What a watch by metadata (PartialObjectMetadata) shows of an object."""
        obj = self.objects[(kind, "team-a", name)]
        return {"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": copy.deepcopy(obj["metadata"])}

    async def replace_status(self, namespace: str, name: str, uid: str, status: dict[str, Any]) -> dict[str, Any]:
        self._maybe_fail("replace_status")
        self.writes.append(status)
        if self.clock is not None:
            self.write_times.append(self.clock.seconds)
        return {"metadata": {"uid": uid, "resourceVersion": str(100 + len(self.writes))}, "status": status}

    async def post_event(self, involved: dict[str, Any], kind: str, reason: str, message: str) -> None:
        self._maybe_fail("post_event")
        self.events.append((kind, reason, message))

    async def events_of(self, namespace: str, kind: str, name: str, uid: str) -> list[dict[str, Any]]:
        return []

    async def delete_sftjob(self, namespace: str, name: str, uid: str) -> None:
        self._maybe_fail("delete_sftjob")
        self.objects.pop(("SFTJob", namespace, name), None)

    def stalled_seconds(self) -> float:
        return 0.0

    async def close(self) -> None:
        pass


class Operator:
    """The status writer and the reconciler wired as runtime.context.Context wires them, on the fakes."""

    def __init__(self, settings: OperatorSettings | None = None, render_options: RenderOptions | None = None,
                 kube: FakeKube | None = None) -> None:
        self.clock = FakeClock()
        self.kube = kube or FakeKube()
        self.kube.clock = self.clock
        self.cache = Cache()
        self.scheduler = ManualScheduler(self.clock)
        self.settings = settings or OperatorSettings()
        self.writer = StatusWriter(self.kube, self.cache, self.scheduler, self.settings,
                                   on_finished=lambda key: self.reconciler.kick(key), clock=self.clock)
        self.reconciler = Reconciler(self.kube, self.cache, self.scheduler, self.writer,
                                     render_options or RenderOptions(), clock=self.clock)

    def status(self, key: Key) -> dict[str, Any]:
        return self.cache.current_status(key)

    async def close(self) -> None:
        await self.scheduler.close()

    def run(self, test: Callable[[Operator], Coroutine[Any, Any, None]]) -> Operator:
        """Run ``test(self)`` in a fresh event loop, then stop the scheduler's tasks."""
        async def main() -> None:
            try:
                await test(self)
            finally:
                await self.close()

        asyncio.run(main())
        return self

