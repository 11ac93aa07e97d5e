"""Converge one SFTJob's children to its spec: ``manage()``, level-triggered and idempotent.

Every path runs it: an SFTJob seen (created, changed, or listed at start), a child deleted, the
periodic resync, a retry after a failure (back-off 5 s doubling to 5 minutes). It acts on what
the cache shows, not on the event: create what is missing (409 AlreadyExists is success when
the object is ours; names are deterministic, so a crash at any point followed by a rerun never
duplicates), bring our ConfigMap's data back to what the renderer says (a rotated CA), apply
``runPolicy.suspend`` to the Job. Once the Job exists the run keeps the config and image it started
with: its config.json is never re-rendered and a spec that a newer operator's models refuse is not
failed, so an upgrade mid-run changes nothing for it. Before the Job exists it refuses what cannot work in a cluster:
a local output path, and a ReadWriteOnce claim that the pods of several nodes would write. For a finished SFTJob it only stops a failed run's Job and arms
``ttlSecondsAfterFinished``; a deleted Job of a finished run is never recreated (it would train again).

It never writes the SFTJob's spec and never touches a Job field other than ``spec.suspend``, nor
an object it did not create (``reconcile.ownership``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from pydantic import ValidationError

from sft_operator.api.types import TERMINAL_PHASES, Phase, SFTJob
from sft_operator.core.advice import advise
from sft_operator.core.decisions import (
    CONFIG_KEY,
    OURS,
    api_error_cause,
    config_map_patch,
    keep_claim_patch,
    conflict_cause,
    local_output_cause,
    ownership,
    prepare_job,
    shared_claims_check,
    stop_patch,
    suspend_patch,
    unexported_model,
    wanted_digests,
)
from sft_operator.core.render import RenderOptions, cache_claim, pvc_claims, render_children
from sft_operator.core.status import INVALID_SPEC, Cause, condition, parse_time
from sft_operator.runtime import metrics
from sft_operator.runtime.cache import Cache, Key, ManagedAs, Rendered, slim
from sft_operator.runtime.client import ApiError
from sft_operator.runtime.clock import SYSTEM_CLOCK, Clock
from sft_operator.runtime.events import EventPoster, post_event
from sft_operator.runtime.scheduler import Scheduler

log = logging.getLogger("sft_operator.runtime.reconcile")
METADATA_CREATED = ("ConfigMap", "Service", "PersistentVolumeClaim")
MANAGE_CONCURRENCY = 32


class ChildrenBlocked(Exception):
    """A child cannot be created now (``cause.final``: ever)."""

    def __init__(self, cause: Cause) -> None:
        super().__init__(f"{cause.reason}: {cause.message}")
        self.cause = cause


class ChildrenApi(EventPoster, Protocol):
    """What the reconciler asks of the API server (runtime.client.KubeClient)."""

    async def create(self, obj: dict[str, Any], *, metadata_only: bool = False) -> dict[str, Any]: ...
    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]: ...
    async def patch(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]: ...
    async def delete_sftjob(self, namespace: str, name: str, uid: str) -> None: ...


class Marks(Protocol):
    """Where the reconciler asks for a status write (runtime.writer.StatusWriter)."""

    def mark(self, key: Key, delay: float | None = None) -> None: ...


class Reconciler:
    """Runs ``manage`` for one SFTJob at a time per key, on the collaborators it is given."""

    def __init__(self, kube: ChildrenApi, cache: Cache, scheduler: Scheduler, writer: Marks,
                 render_options: RenderOptions, *, clock: Clock = SYSTEM_CLOCK,
                 concurrency: int = MANAGE_CONCURRENCY) -> None:
        self.kube, self.cache, self.scheduler, self.writer, self.clock = kube, cache, scheduler, writer, clock
        self.render_options = render_options
        self.render_version = 0  # bumped when render_options change (a rotated CA): every ConfigMap is checked
        # Reconciles running at once: a burst of 1,000 new SFTJobs would otherwise hold 1,000 rendered sets of
        # children in memory while they queue for the API; the client's slots are the real limit anyway.
        self.slots = asyncio.Semaphore(concurrency)

    def set_render_options(self, options: RenderOptions) -> None:
        """New options (e.g. the progress CA was rotated): reconcile every unfinished job against them."""
        self.render_options = options
        self.render_version += 1
        for key in list(self.cache.sftjobs):
            self.kick(key)

    def kick(self, key: Key, delay: float = 0.0) -> None:
        """Reconcile ``key``'s children (soon, once: repeated kicks share one run)."""
        self.scheduler.at(key, "manage", delay, lambda: self.manage(key))

    async def manage(self, key: Key) -> None:
        """Converge ``key``'s children to its spec (the module docstring)."""
        async with self.scheduler.lock(key, "manage"), self.slots:  # in this order: no slot waits on a lock
            started = self.clock.monotonic()
            try:
                await self._manage(key)
            finally:
                metrics.observe_reconcile(self.clock.monotonic() - started)


    async def _manage(self, key: Key) -> None:
        sftjob = self.cache.sftjobs.get(key)
        if sftjob is None or sftjob["metadata"].get("deletionTimestamp"):
            return
        status = self.cache.current_status(key)
        notes = self.cache.note(key)
        if status.get("phase") in TERMINAL_PHASES:
            if not self.converged(key):
                await self._finished(key, sftjob, status)
            return
        if notes.creation_error is not None and notes.creation_error.final:
            return  # the writer is about to say Failed

        if self.converged(key):
            return  # the common case (every status write brings the SFTJob back): no parsing, no rendering
        try:
            parsed = SFTJob.model_validate({**sftjob, "status": None})
        except ValidationError as exc:  # the API server's schema should have caught it
            if self.started(key, sftjob):  # an upgrade's stricter models: the run goes on as it started
                await self._keep_running(key, sftjob, exc)
                return
            self._blocked(key, Cause(INVALID_SPEC, str(exc)[:2048]))
            return
        refused = local_output_cause(parsed.spec)
        if refused is not None and not self.started(key, sftjob):
            self._blocked(key, refused)
            return
        try:
            digest, kinds = await self._ensure_children(key, sftjob, parsed)
        except ChildrenBlocked as exc:
            self._blocked(key, exc.cause)
            return
        except ApiError as exc:  # patching the Job (suspend) or the ConfigMap failed
            self._blocked(key, Cause("CreateFailed" if exc.status else "Unreachable", str(exc)))
            return
        notes.rendered = Rendered(self.managed_as(sftjob), digest, kinds)
        if notes.creation_error is not None:
            log.info("SFTJob %s/%s: children created after earlier failures", *key)
            notes.creation_error = None
        self.scheduler.succeeded(key, "manage")
        self.writer.mark(key)


    def started(self, key: Key, sftjob: dict[str, Any]) -> bool:
        """Whether the run is under way: our Job exists. From then on the job keeps the config and image it
        started with (the Job's pod template pins the image; our ConfigMap's config.json is not re-rendered),
        so an operator upgrade with a changed renderer or stricter models never changes or fails a running job."""
        job = self.cache.child("Job", key)
        return job is not None and ownership(job, sftjob) == OURS


    async def _keep_running(self, key: Key, sftjob: dict[str, Any], error: ValidationError) -> None:
        """A running job whose spec these models no longer accept: nothing is re-rendered; only
        runPolicy.suspend still applies. Logged once per spec generation."""
        notes = self.cache.note(key)
        if notes.rendered is None or notes.rendered.managed_as != self.managed_as(sftjob):
            log.warning("SFTJob %s/%s: its spec does not validate under this operator's models (%s); it keeps running "
                        "with the config it started with", *key, str(error).splitlines()[0])
        await self._apply_suspend(key, wants_suspended(sftjob))
        config_map = self.cache.child("ConfigMap", key) or {}
        kinds = tuple(kind for kind in ("ConfigMap", "Service", "Job") if self.cache.child(kind, key) is not None)
        notes.rendered = Rendered(self.managed_as(sftjob), config_map.get("dataDigests"), kinds)


    def managed_as(self, sftjob: dict[str, Any]) -> ManagedAs:
        """What a reconcile was for: this SFTJob (uid), this spec (generation), these render options."""
        meta = sftjob["metadata"]
        return ManagedAs(meta.get("uid"), meta.get("generation"), self.render_version)


    def converged(self, key: Key) -> bool:
        """Whether the cache shows everything a reconcile of ``key`` would make, without running it:
        the last reconcile was for this spec, all its children are ours (the ConfigMap as rendered)
        and the Job's suspension is what runPolicy.suspend says."""
        sftjob, notes = self.cache.sftjobs.get(key), self.cache.notes.get(key)
        if sftjob is None or notes is None:
            return False
        if self.cache.finished(key):  # a finished job: its Job stopped (if it failed), its TTL armed, for this spec
            return notes.finished == self.managed_as(sftjob)
        if notes.rendered is None or notes.rendered.managed_as != self.managed_as(sftjob):
            return False
        uid = sftjob["metadata"].get("uid")
        children = [self.cache.child(kind, key) for kind in notes.rendered.kinds]
        if any(c is None or (c["metadata"].get("ownerReferences") or [{}])[0].get("uid") != uid for c in children):
            return False
        config_map, job = self.cache.child("ConfigMap", key), self.cache.child("Job", key)
        return config_map.get("dataDigests") == notes.rendered.config_digest and suspend_patch(wants_suspended(sftjob), job) is None


    async def _apply_suspend(self, key: Key, suspended: bool) -> None:
        """runPolicy.suspend onto our Job, if it exists and differs."""
        job = self.cache.child("Job", key)
        patch = suspend_patch(suspended, job) if job is not None else None
        if patch is not None:
            self.cache.put("Job", await self.kube.patch("Job", key[0], job["metadata"]["name"], patch))


    def _blocked(self, key: Key, cause: Cause) -> None:
        """Say why in status; retry with back-off unless no retry can help."""
        notes = self.cache.note(key)
        if notes.creation_error != cause:
            log.warning("SFTJob %s/%s: %s: %s", *key, cause.reason, cause.message)
        notes.creation_error = cause
        metrics.record_reconcile_error()
        if not cause.final:
            self.kick(key, self.scheduler.failed(key, "manage"))
        self.writer.mark(key, 0.0)


    async def _ensure_children(self, key: Key, sftjob: dict[str, Any], parsed: SFTJob) -> tuple[str, tuple[str, ...]]:
        """Create what is missing, correct what drifted; the digest of the ConfigMap's rendered data and the
        kinds of the children."""
        children = render_children(parsed, self.render_options)
        config_map, service, claims, job = children[0], children[1], children[2:-1], children[-1]
        keep = (CONFIG_KEY,) if self.started(key, sftjob) else ()  # a running job keeps the config it started with
        await asyncio.gather(self._ensure(key, sftjob, config_map, keep), self._ensure(key, sftjob, service),
                             *(self._ensure(key, sftjob, claim) for claim in claims))
        warnings: list[str] = []
        if self.cache.child("Job", key) is None:  # before any pod starts: can every node mount what it writes?
            warnings = await self._check_shared_claims(sftjob, parsed)
        created = await self._ensure(key, sftjob, prepare_job(job))
        await self._apply_suspend(key, parsed.spec.run_policy.suspend)
        if created:
            self.scheduler.spawn(self._announce(sftjob, parsed, warnings), name=f"advice {key}")
        return wanted_digests(self.cache.child("ConfigMap", key), config_map, keep), tuple(child["kind"] for child in children)


    async def _ensure(self, key: Key, sftjob: dict[str, Any], child: dict[str, Any], keep: tuple[str, ...] = ()) -> bool:
        """Make ``child`` exist as ours; True when this call created it."""
        kind, name = child["kind"], child["metadata"]["name"]
        existing = self.cache.child(kind, key)
        if existing is None:
            try:
                self.cache.put(kind, await self._create(child))
                return True
            except ApiError as exc:
                if exc.status != 409:
                    cause = api_error_cause(exc.status, exc.message, kind, name)
                    raise ChildrenBlocked(cause) from exc
            try:
                existing = await self.kube.get(kind, key[0], name)
            except ApiError as exc:  # deleted between the 409 and the read: the next run creates it
                raise ChildrenBlocked(api_error_cause(exc.status, exc.message, kind, name)) from exc
            if ownership(existing, sftjob) == OURS:
                self.cache.put(kind, existing)
                existing = self.cache.child(kind, key)
        if ownership(existing, sftjob) != OURS:
            raise ChildrenBlocked(conflict_cause(kind, existing, sftjob))
        if kind == "ConfigMap" and existing.get("dataDigests") is None:  # changed since we read its data (watched by metadata)
            try:
                fresh = await self.kube.get(kind, key[0], name)
            except ApiError as exc:
                raise ChildrenBlocked(api_error_cause(exc.status, exc.message, kind, name)) from exc
            if ownership(fresh, sftjob) != OURS:
                raise ChildrenBlocked(conflict_cause(kind, fresh, sftjob))
            self.cache.put(kind, fresh)
            existing = slim(kind, fresh)
        if kind == "ConfigMap":
            patch = config_map_patch(existing, child, keep)
            if patch is not None:
                log.info("SFTJob %s/%s: ConfigMap %s brought up to date", *key, name)
                self.cache.put(kind, await self.kube.patch(kind, key[0], name, patch))
        return False


    async def _create(self, child: dict[str, Any]) -> dict[str, Any]:
        """Create a child. The API server answers a ConfigMap, Service or claim with its metadata alone: the cache keeps
        nothing else of them but a ConfigMap's data, which is what was sent. A Job comes back whole (its defaults)."""
        if child["kind"] not in METADATA_CREATED:
            return await self.kube.create(child)
        meta = await self.kube.create(child, metadata_only=True)
        return {**meta, "apiVersion": child.get("apiVersion"), "kind": child["kind"], "data": child.get("data")}


    async def _announce(self, sftjob: dict[str, Any], parsed: SFTJob, warnings: list[str]) -> None:
        """On creating the Job: count it, and give the advice a person acts on as one Warning Event."""
        metrics.record_created(sftjob["metadata"]["namespace"])
        items = [str(a) for a in advise(parsed.spec)] + warnings
        if items:
            await post_event(self.kube, sftjob, "Warning", "Advice", "; ".join(items))


    async def _check_shared_claims(self, sftjob: dict[str, Any], parsed: SFTJob) -> list[str]:
        """Multi-node runs mount their claims on every node. A ReadWriteOnce claim they write (the output, a
        named cache) cannot work: ChildrenBlocked, final. One they only read is warned about (Multi-Attach
        on most storage). Missing claims are left to the scheduler (Unschedulable, with its message)."""
        if parsed.spec.resources.nodes < 2:
            return []  # (no read needed)
        names = set(pvc_claims(parsed)) | {cache_claim(parsed)} - {None}
        found = {}
        for claim in sorted(names):
            try:
                found[claim] = await self.kube.get("PersistentVolumeClaim", sftjob["metadata"]["namespace"], claim)
            except ApiError:
                continue
        failure, warnings = shared_claims_check(parsed, found)
        if failure is not None:
            raise ChildrenBlocked(failure)
        return warnings


    async def _finished(self, key: Key, sftjob: dict[str, Any], status: dict[str, Any]) -> None:
        """A finished SFTJob: its failed Job keeps no pods; ttlSecondsAfterFinished is (re-)armed."""
        if status.get("phase") == Phase.failed.value:
            reason = (condition(status, "Failed") or {}).get("reason", "Failed")
            patch = stop_patch(self.cache.job_of(key), reason)
            if patch is not None:
                try:
                    self.cache.put("Job", await self.kube.patch("Job", key[0], self.cache.job_of(key)["metadata"]["name"], patch))
                    log.info("SFTJob %s/%s failed (%s): its Job is suspended, so its pods release their GPUs", *key, reason)
                    self.scheduler.succeeded(key, "manage")
                except ApiError as exc:
                    delay = self.scheduler.failed(key, "manage")
                    log.warning("SFTJob %s/%s: could not stop its Job (%s); retrying in %.0fs", *key, exc, delay)
                    self.kick(key, delay)
                    return
            if not await self._keep_unexported_model(key, sftjob, status):
                return
        self.cache.note(key).finished = self.managed_as(sftjob)  # done for this spec (a TTL edit changes it)
        ttl = ((sftjob.get("spec") or {}).get("runPolicy") or {}).get("ttlSecondsAfterFinished")
        if ttl is None:
            self.scheduler.cancel(key, "ttl")
            return
        finished = parse_time(status.get("completionTime"))
        now = self.clock.now().timestamp()
        delay = max(0.0, (finished.timestamp() if finished else now) + ttl - now)
        uid = sftjob["metadata"]["uid"]
        self.scheduler.at(key, "ttl", delay, lambda: self._delete_after_ttl(key, uid), earliest=False)


    async def _keep_unexported_model(self, key: Key, sftjob: dict[str, Any], status: dict[str, Any]) -> bool:
        """A failed job that trained through its last step and lost only the export: its cache claim holds the
        model. Release the claim from the SFTJob, so that deleting the SFTJob never deletes that model, and say
        how to export or discard it. False when the API call failed (retried with back-off)."""
        claim_name = unexported_model(sftjob, status)
        if claim_name is None:
            return True
        try:
            claim = await self.kube.get("PersistentVolumeClaim", key[0], claim_name)
            patch = keep_claim_patch(claim, sftjob)
            if patch is None:
                return True
            await self.kube.patch("PersistentVolumeClaim", key[0], claim_name, patch)
        except ApiError as exc:
            if exc.status == 404:
                return True
            delay = self.scheduler.failed(key, "manage")
            log.warning("SFTJob %s/%s: could not keep its unexported model's claim %s (%s); retrying in %.0fs",
                        *key, claim_name, exc, delay)
            self.kick(key, delay)
            return False
        destination = sftjob["spec"]["output"]["destination"]
        log.info("SFTJob %s/%s: trained model not exported; claim %s released from the SFTJob and kept", *key, claim_name)
        await post_event(self.kube, sftjob, "Warning", "ModelKept", (
            f"training finished but the export to {destination} failed; the trained model is kept on "
            f"PersistentVolumeClaim {claim_name}, which deleting this SFTJob no longer deletes. To export it, apply an "
            f"SFTJob with output.destination {destination} and storage.cache.claimName {claim_name}: it exports "
            f"without training. To discard it: kubectl delete pvc {claim_name}"))
        return True


    async def _delete_after_ttl(self, key: Key, uid: str) -> None:
        log.info("SFTJob %s/%s: ttlSecondsAfterFinished passed, deleting it", *key)
        try:
            await self.kube.delete_sftjob(key[0], key[1], uid)
        except ApiError as exc:
            delay = self.scheduler.failed(key, "manage")
            log.warning("SFTJob %s/%s: delete after TTL failed (%s); retrying in %.0fs", *key, exc, delay)
            self.scheduler.at(key, "ttl", delay, lambda: self._delete_after_ttl(key, uid), earliest=False)



def wants_suspended(sftjob: dict[str, Any]) -> bool:
    return bool(((sftjob.get("spec") or {}).get("runPolicy") or {}).get("suspend"))


