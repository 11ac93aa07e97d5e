"""The one status writer: the watches and the progress endpoint mark an SFTJob, the writer writes.

A mark asks for a write after a short window (``status_window_seconds``), so the changes of a
burst (pod Running, pod Succeeded, Job Complete) become one write. A write is: lock the SFTJob,
derive its status from the cache (``status.derive_status``), add the trainer's newest progress
report (at most one per ``progress_min_interval_seconds``) and, once it succeeded, the result in
its termination message; write the whole status if it changed, with the SFTJob's uid as a
precondition; then apply what ``status.transition`` says follows (Events, metrics, stopping a Job).

States every healthy job passes through (children being created, pods being created and starting,
pods finished before the Job says Complete, the Job Complete before rank 0's pod brought the result)
are held back for a while (``status.settle_until``):
the next state usually follows, and a burst of new SFTJobs then costs a write or two less per job.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Protocol

from pydantic import ValidationError

from sft_contract.messages import ProgressReport
from sft_operator.api.types import TERMINAL_PHASES, SFTJobSpec
from sft_operator.core.status import (
    LOOKUP_AGAIN_SECONDS,
    SUCCEEDED,
    Effects,
    derive_status,
    lookups,
    parse_time,
    pod_creation_cause,
    recheck_seconds,
    result_from_pods,
    result_pods,
    settle_until,
    track_start_clocks,
    transition,
    volume_problem,
    with_data,
    with_evaluation,
    with_evaluation_condition,
    with_progress,
    with_result,
)
from sft_operator.runtime import metrics
from sft_operator.runtime.cache import Cache, Key
from sft_operator.runtime.client import ApiError
from sft_operator.runtime.clock import SYSTEM_CLOCK, Clock
from sft_operator.runtime.events import EventPoster, post_event
from sft_operator.runtime.scheduler import Scheduler
from sft_operator.runtime.settings import OperatorSettings

log = logging.getLogger("sft_operator.core.status")
LOOKUP_SLOTS = 2  # event reads in flight
QUEUE_HOLD_SECONDS = 60.0  # children, pods or Complete awaited from a controller's queue (long in a burst)
UNLISTED_RECHECK_SECONDS = 1.0  # a job whose scope's first lists are not complete yet: look again this soon
STARTING_HOLD_SECONDS = 30.0  # a pod starting: seconds normally, ~15 s in a 1000-job burst on 2 cores


class ProgressRefused(Exception):
    """A progress report the writer will not take: `status` is the HTTP status, `reason` one word."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


# What the pods are doing now: always the newer report's (a training report ends the fetching stage).
STAGE_FIELDS = ("stage", "bytes_done", "bytes_total")


def merge_reports(older: ProgressReport | None, newer: ProgressReport) -> ProgressReport:
    """Coalesce: the newer report wins field by field; fields it lacks keep the older value
    (an eval loss reported between two writes is not lost), except the stage and its bytes."""
    if older is None:
        return newer
    data = older.model_dump(exclude_none=True)
    data.update(newer.model_dump(exclude_none=True))
    data.update({k: getattr(newer, k) for k in STAGE_FIELDS})
    return ProgressReport.model_validate(data)


class StatusApi(EventPoster, Protocol):
    """What the writer asks of the API server (runtime.client.KubeClient)."""

    async def replace_status(self, namespace: str, name: str, uid: str, status: dict[str, Any]) -> dict[str, Any]: ...
    async def events_of(self, namespace: str, kind: str, name: str, uid: str) -> list[dict[str, Any]]: ...


@dataclass
class _Progress:
    report: ProgressReport | None = None  # waiting to be written
    last_write: float = -1e9  # monotonic time of the last write that carried a report


class StatusWriter:
    """``on_finished(key)`` is called once a job's final status is written (the reconciler then stops a
    failed run's Job and arms its TTL); ``unlisted`` holds the (kind, namespace or None) scopes of the
    children's watches whose first list has not completed (runtime.watch): no status is derived there."""

    def __init__(self, kube: StatusApi, cache: Cache, scheduler: Scheduler, settings: OperatorSettings, *,
                 on_finished: Callable[[Key], None], unlisted: set[tuple[str, str | None]] | None = None,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.kube, self.cache, self.scheduler, self.settings, self.clock = kube, cache, scheduler, settings, clock
        self.on_finished = on_finished
        self.unlisted = unlisted if unlisted is not None else set()
        self.progress: dict[Key, _Progress] = {}
        self.looked_up: dict[tuple[Key, str], float] = {}  # (key, object uid) -> when its events were read
        self._effective_batch: dict[tuple[str, int], int | None] = {}
        self.lookup_slots = asyncio.Semaphore(LOOKUP_SLOTS)

    # ---- feeding ----

    def mark(self, key: Key, delay: float | None = None) -> None:
        """Something about ``key`` changed: write its status after the window (or ``delay``)."""
        window = self.settings.status_window_seconds if delay is None else delay
        self.scheduler.at(key, "status", window, lambda: self.write(key))

    def offer(self, namespace: str, name: str, uid: str, report: ProgressReport) -> None:
        """A verified trainer's report for the SFTJob with this uid; raises ProgressRefused."""
        key = (namespace, name)
        sftjob = self.cache.sftjobs.get(key)
        if sftjob is None:
            raise ProgressRefused(404, "NotFound", f"SFTJob {namespace}/{name} not found")
        if sftjob["metadata"].get("uid") != uid:
            raise ProgressRefused(409, "Recreated", f"SFTJob {namespace}/{name} was deleted and created again")
        if self.cache.current_status(key).get("phase") in TERMINAL_PHASES:
            raise ProgressRefused(409, "Finished", f"SFTJob {namespace}/{name} has finished; its status is final")
        state = self.progress.setdefault(key, _Progress())
        state.report = merge_reports(state.report, report)
        wait = state.last_write + self.settings.progress_min_interval_seconds - self.clock.monotonic()
        self.mark(key, max(wait, self.settings.status_window_seconds))

    def forget(self, key: Key) -> None:
        self.progress.pop(key, None)
        for seen in [k for k in self.looked_up if k[0] == key]:
            del self.looked_up[seen]

    # ---- writing ----

    def effective_batch_size(self, sftjob: dict[str, Any]) -> int | None:
        meta = sftjob.get("metadata") or {}
        cache_key = (meta.get("uid", ""), meta.get("generation", 0))
        if cache_key not in self._effective_batch:
            if len(self._effective_batch) > 4 * len(self.cache.sftjobs) + 64:
                self._effective_batch.clear()
            try:
                size = SFTJobSpec.model_validate(sftjob.get("spec") or {}).effective_batch_size
            except ValidationError:
                size = None
            self._effective_batch[cache_key] = size
        return self._effective_batch[cache_key]

    async def write(self, key: Key) -> None:
        async with self.scheduler.lock(key):
            sftjob = self.cache.sftjobs.get(key)
            if sftjob is None or sftjob["metadata"].get("deletionTimestamp"):
                self.progress.pop(key, None)
                return
            if any(namespace in (None, key[0]) for _, namespace in self.unlisted):
                # After a restart, until the pods are listed: derived now, a Running job would read Pending.
                self.mark(key, UNLISTED_RECHECK_SECONDS)
                return
            uid = sftjob["metadata"]["uid"]
            current = self.cache.current_status(key)
            job = self.cache.job_of(key)
            job_uid = (job or {}).get("metadata", {}).get("uid")
            pods = self.cache.pods_of(key, job_uid)
            notes = self.cache.note(key)
            now = self.clock.now()
            grace = self.settings.pod_start_grace_seconds
            notes.start_clocks = track_start_clocks(pods, notes.start_clocks, now)
            derived = derive_status(
                {**sftjob, "status": current}, job, pods, now,
                start_grace_seconds=grace,
                effective_batch_size=self.effective_batch_size(sftjob),
                creation_error=notes.creation_error,
                pod_creation_error=notes.pod_creation_error,
                pod_problems=notes.pod_problems,
                start_clocks=notes.start_clocks,
                replaced_pods=notes.replaced_by(job_uid),
                queue_workload=self.cache.workload_of(key, job_uid),
            )
            desired = {**current, **derived}  # what the trainer reported stays
            report = result = None
            progress = self.progress.get(key)
            if progress and progress.report is not None and desired.get("phase") not in TERMINAL_PHASES:
                wait = progress.last_write + self.settings.progress_min_interval_seconds - self.clock.monotonic()
                if wait <= 0:
                    report = progress.report
                    desired = with_progress(desired, report)
                else:
                    self.mark(key, wait)
            elif progress and progress.report is not None and progress.report.evaluation is not None:
                # A gate that failed the job: its last report (the verdict) may come after the pod's end.
                desired = with_evaluation(desired, progress.report.evaluation)
            if progress and progress.report is not None and desired.get("phase") in TERMINAL_PHASES:
                desired = with_data(desired, progress.report)  # the data check that failed the job: kept
            # Level-triggered: a Succeeded status lacks its result until rank 0's pod shows it, whichever
            # came first (the Job's Complete or the pod's last update) and whenever the operator started.
            result_seen = desired.get("phase") == SUCCEEDED and bool(result_pods(pods))
            if result_seen:
                result = result_from_pods(pods)
                if result is not None:
                    with_it = with_result(desired, result)
                    result = result if with_it != desired else None  # already in status: nothing new to say
                    desired = with_it

            desired = with_evaluation_condition(desired, current, now)

            self._schedule_lookups(key, job, pods, now)
            recheck = recheck_seconds(pods, now, grace, notes.pod_problems, notes.start_clocks) if desired.get("phase") not in TERMINAL_PHASES else None
            if recheck is not None:
                self.mark(key, recheck + 0.5)

            if desired == current:
                if result_seen:
                    self.cache.result_read(key)
                return
            until = None if report is not None else settle_until(
                current, desired, sftjob, job, pods,
                queue_seconds=QUEUE_HOLD_SECONDS, starting_seconds=STARTING_HOLD_SECONDS)
            if until is not None and until > now:
                self.mark(key, (until - now).total_seconds())
                return
            try:
                written = await self.kube.replace_status(key[0], key[1], uid, desired)
            except ApiError as exc:
                self._write_failed(key, exc)
                return
            self.scheduler.succeeded(key, "status")
            if result_seen:  # written: rank 0's pod has nothing more to say
                self.cache.result_read(key)
            self.cache.record_write(key, written)
            if report is not None and progress is not None:
                progress.last_write = self.clock.monotonic()
                if progress.report is report:
                    progress.report = None
                metrics.set_job_metrics(key[0], key[1], report)
            effects = transition(current, desired, result.warning if result is not None else None)
        self._apply(key, sftjob, effects)
        metrics.set_phase_counts(self.cache.phase_counts())

    def _write_failed(self, key: Key, exc: ApiError) -> None:
        if exc.status == 404:  # deleted meanwhile: the watch says so too
            return
        metrics.record_reconcile_error()
        if exc.status == 422:  # the uid test failed (re-created) or the status broke the schema: not retried
            log.warning("SFTJob %s/%s: status write refused: %s", *key, exc.message)
            return
        delay = self.scheduler.failed(key, "status")
        log.warning("SFTJob %s/%s: status write failed (%s); retrying in %.0fs", *key, exc, delay)
        self.mark(key, delay)

    def _apply(self, key: Key, sftjob: dict[str, Any], effects: Effects) -> None:
        namespace = key[0]
        if effects.log:
            log.info("SFTJob %s/%s: %s", *key, effects.log)
        for event in effects.events:
            self.scheduler.spawn(post_event(self.kube, sftjob, event.type, event.reason, event.message), name=f"event {key}")
        if effects.started:
            created = parse_time(sftjob["metadata"].get("creationTimestamp"))
            if created:
                metrics.record_running(namespace, (self.clock.now() - created).total_seconds())
        if effects.evaluation_passed is not None:
            metrics.set_evaluation_passed(namespace, key[1], effects.evaluation_passed)
        if effects.finished:
            result, reason, seconds = effects.finished
            metrics.record_finished(namespace, result, reason, seconds)
            metrics.remove_job(*key)  # per-job series live only while the job runs
            self.progress.pop(key, None)
            self.on_finished(key)  # stop the Job of a failed run, arm ttlSecondsAfterFinished

    # ---- reading events that explain a stuck job ----

    def _schedule_lookups(self, key: Key, job: dict[str, Any] | None, pods: list[dict[str, Any]], now: datetime) -> None:
        notes = self.cache.note(key)
        if notes.pod_creation_error is not None and [p for p in pods if p.get("status", {}).get("phase") != "Failed"]:
            notes.pod_creation_error = None  # pods exist: the old FailedCreate no longer speaks for them
        live = {p["metadata"].get("uid") for p in pods}
        for uid in [u for u in notes.pod_problems if u not in live]:
            del notes.pod_problems[uid]
        for lookup in lookups(job, pods, now):
            last = self.looked_up.get((key, lookup.uid))
            delay = lookup.after_seconds if last is None else max(lookup.after_seconds,
                                                                   last + LOOKUP_AGAIN_SECONDS - self.clock.monotonic())
            self.scheduler.at(key, f"events {lookup.uid}", delay,
                                  lambda lookup=lookup: self._read_events(key, lookup.kind, lookup.name, lookup.uid))

    def _still_due(self, key: Key, uid: str) -> bool:
        """Whether the lookup of ``uid`` still explains something now: the pods it waited for may have
        appeared or started meanwhile (in a burst nearly every Job waits a while for its pods)."""
        job = self.cache.job_of(key)
        pods = self.cache.pods_of(key, (job or {}).get("metadata", {}).get("uid"))
        return any(lookup.uid == uid and lookup.after_seconds <= 1.0 for lookup in lookups(job, pods, self.clock.now()))

    async def _read_events(self, key: Key, kind: str, name: str, uid: str) -> None:
        # Listing events costs the API server a scan of the namespace's events. In a burst many Jobs
        # wait 10 s for their pods: the reads go a few at a time, each only if still needed by its turn.
        async with self.lookup_slots:
            if not self._still_due(key, uid):
                return
            self.looked_up[(key, uid)] = self.clock.monotonic()
            try:
                events = await self.kube.events_of(key[0], kind, name, uid)
            except ApiError as exc:  # e.g. no RBAC to list events: status just says less
                log.debug("cannot list events of %s %s/%s: %s", kind, key[0], name, exc)
                return
        notes = self.cache.note(key)
        newest = sorted(events, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
        if kind == "Job":
            failed = [e for e in newest if e.get("reason") == "FailedCreate"]
            cause = pod_creation_cause(failed[-1].get("message", "")) if failed else None
            changed = cause is not None and cause != notes.pod_creation_error
            if cause is not None:
                notes.pod_creation_error = cause
        else:  # a volume problem that is over (a later event shows progress) is dropped
            cause = volume_problem(events)
            if cause is not None and cause.since is None:  # events without times: from our first read of them
                old = notes.pod_problems.get(uid)
                cause = replace(cause, since=old.since if old is not None and old.since else self.clock.now())
            changed = notes.pod_problems.get(uid) != cause
            if cause is not None:
                notes.pod_problems[uid] = cause
            else:
                notes.pod_problems.pop(uid, None)
        if changed and cause is not None:
            log.warning("SFTJob %s/%s: %s: %s", *key, cause.reason, cause.message)
        self.mark(key, 0.0)
