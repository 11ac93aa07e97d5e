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
import time
from typing import TYPE_CHECKING, Any

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
from sft_operator.core.render import cache_claim, pvc_claims, render_children
from sft_operator.core.status import INVALID_SPEC, Cause, condition, parse_time
from sft_operator.runtime import metrics
from sft_operator.runtime.cache import Key, slim
from sft_operator.runtime.client import ApiError

if TYPE_CHECKING:
    from sft_operator.runtime.context import Context

log = logging.getLogger("sft_operator.runtime.reconcile")
METADATA_CREATED = ("ConfigMap", "Service", "PersistentVolumeClaim")


class ChildrenBlocked(Exception):
    """A child cannot be created now (``cause.final``: ever)."""

    def __init__(self, cause: Cause) -> None:
        super().__init__(f"{cause.reason}: {cause.message}")
        self.cause = cause


async def manage(ctx: Context, key: Key) -> None:
    async with ctx.scheduler.lock(key, "manage"), ctx.manage_slots:  # in this order: no slot waits on a lock
        started = time.monotonic()
        try:
            await _manage(ctx, key)
        finally:
            metrics.observe_reconcile(time.monotonic() - started)


async def _manage(ctx: Context, key: Key) -> None:
    sftjob = ctx.cache.sftjobs.get(key)
    if sftjob is None or sftjob["metadata"].get("deletionTimestamp"):
        return
    status = ctx.cache.current_status(key)
    notes = ctx.cache.note(key)
    if status.get("phase") in TERMINAL_PHASES:
        if not converged(ctx, key):
            await _finished(ctx, key, sftjob, status)
        return
    if notes.creation_error is not None and notes.creation_error.final:
        return  # the writer is about to say Failed

    if converged(ctx, key):
        return  # the common case (every status write brings the SFTJob back): no parsing, no rendering
    try:
        parsed = SFTJob.model_validate({**sftjob, "status": None})
    except ValidationError as exc:  # the API server's schema should have caught it
        if started(ctx, key, sftjob):  # an upgrade's stricter models: the run goes on as it started
            await _keep_running(ctx, key, sftjob, exc)
            return
        _blocked(ctx, key, Cause(INVALID_SPEC, str(exc)[:2048]))
        return
    refused = local_output_cause(parsed.spec)
    if refused is not None and not started(ctx, key, sftjob):
        _blocked(ctx, key, refused)
        return
    try:
        digest, kinds = await _ensure_children(ctx, key, sftjob, parsed)
    except ChildrenBlocked as exc:
        _blocked(ctx, key, exc.cause)
        return
    except ApiError as exc:  # patching the Job (suspend) or the ConfigMap failed
        _blocked(ctx, key, Cause("CreateFailed" if exc.status else "Unreachable", str(exc)))
        return
    notes.rendered = (managed_as(ctx, sftjob), digest, kinds)
    if notes.creation_error is not None:
        log.info("SFTJob %s/%s: children created after earlier failures", *key)
        notes.creation_error = None
    ctx.scheduler.succeeded(key, "manage")
    ctx.writer.mark(key)


def started(ctx: Context, key: Key, sftjob: dict[str, Any]) -> bool:
    """Whether the run is under way: our Job exists. From then on the job keeps the config and image it
    started with (the Job's pod template pins the image; our ConfigMap's config.json is not re-rendered),
    so an operator upgrade with a changed renderer or stricter models never changes or fails a running job."""
    job = ctx.cache.child("Job", key)
    return job is not None and ownership(job, sftjob) == OURS


async def _keep_running(ctx: Context, key: Key, sftjob: dict[str, Any], error: ValidationError) -> None:
    """A running job whose spec these models no longer accept: nothing is re-rendered; only
    runPolicy.suspend still applies. Logged once per spec generation."""
    notes = ctx.cache.note(key)
    if notes.rendered is None or notes.rendered[0] != managed_as(ctx, sftjob):
        log.warning("SFTJob %s/%s: its spec does not validate under this operator's models (%s); it keeps running "
                    "with the config it started with", *key, str(error).splitlines()[0])
    await _apply_suspend(ctx, key, wants_suspended(sftjob))
    config_map = ctx.cache.child("ConfigMap", key) or {}
    kinds = tuple(kind for kind in ("ConfigMap", "Service", "Job") if ctx.cache.child(kind, key) is not None)
    notes.rendered = (managed_as(ctx, sftjob), config_map.get("dataDigests"), kinds)


def managed_as(ctx: Context, sftjob: dict[str, Any]) -> tuple[Any, Any, int]:
    """What a reconcile was for: this SFTJob (uid), this spec (generation), these render options."""
    meta = sftjob["metadata"]
    return (meta.get("uid"), meta.get("generation"), ctx.render_version)


def converged(ctx: Context, key: Key) -> bool:
    """Whether the cache shows everything a reconcile of ``key`` would make, without running it:
    the last reconcile was for this spec, all its children are ours (the ConfigMap as rendered)
    and the Job's suspension is what runPolicy.suspend says."""
    sftjob, notes = ctx.cache.sftjobs.get(key), ctx.cache.notes.get(key)
    if sftjob is None or notes is None:
        return False
    if ctx.cache.finished(key):  # a finished job: its Job stopped (if it failed), its TTL armed, for this spec
        return notes.finished == managed_as(ctx, sftjob)
    if notes.rendered is None or notes.rendered[0] != managed_as(ctx, sftjob):
        return False
    uid = sftjob["metadata"].get("uid")
    children = [ctx.cache.child(kind, key) for kind in notes.rendered[2]]
    if any(c is None or (c["metadata"].get("ownerReferences") or [{}])[0].get("uid") != uid for c in children):
        return False
    config_map, job = ctx.cache.child("ConfigMap", key), ctx.cache.child("Job", key)
    return config_map.get("dataDigests") == notes.rendered[1] and suspend_patch(wants_suspended(sftjob), job) is None


def wants_suspended(sftjob: dict[str, Any]) -> bool:
    return bool(((sftjob.get("spec") or {}).get("runPolicy") or {}).get("suspend"))


async def _apply_suspend(ctx: Context, key: Key, suspended: bool) -> None:
    """runPolicy.suspend onto our Job, if it exists and differs."""
    job = ctx.cache.child("Job", key)
    patch = suspend_patch(suspended, job) if job is not None else None
    if patch is not None:
        ctx.cache.put("Job", await ctx.kube.patch("Job", key[0], job["metadata"]["name"], patch))


def _blocked(ctx: Context, key: Key, cause: Cause) -> None:
    """Say why in status; retry with back-off unless no retry can help."""
    notes = ctx.cache.note(key)
    if notes.creation_error != cause:
        log.warning("SFTJob %s/%s: %s: %s", *key, cause.reason, cause.message)
    notes.creation_error = cause
    metrics.record_reconcile_error()
    if not cause.final:
        ctx.kick(key, ctx.scheduler.failed(key, "manage"))
    ctx.writer.mark(key, 0.0)


async def _ensure_children(ctx: Context, key: Key, sftjob: dict[str, Any], parsed: SFTJob) -> tuple[str, tuple[str, ...]]:
    """Create what is missing, correct what drifted; the digest of the ConfigMap's rendered data and the
    kinds of the children."""
    children = render_children(parsed, ctx.render_options)
    config_map, service, claims, job = children[0], children[1], children[2:-1], children[-1]
    keep = (CONFIG_KEY,) if started(ctx, key, sftjob) else ()  # a running job keeps the config it started with
    await asyncio.gather(_ensure(ctx, key, sftjob, config_map, keep), _ensure(ctx, key, sftjob, service),
                         *(_ensure(ctx, key, sftjob, claim) for claim in claims))
    warnings: list[str] = []
    if ctx.cache.child("Job", key) is None:  # before any pod starts: can every node mount what it writes?
        warnings = await _check_shared_claims(ctx, sftjob, parsed)
    created = await _ensure(ctx, key, sftjob, prepare_job(job))
    await _apply_suspend(ctx, key, parsed.spec.run_policy.suspend)
    if created:
        ctx.scheduler.spawn(_announce(ctx, sftjob, parsed, warnings), name=f"advice {key}")
    return wanted_digests(ctx.cache.child("ConfigMap", key), config_map, keep), tuple(child["kind"] for child in children)


async def _ensure(ctx: Context, key: Key, sftjob: dict[str, Any], child: dict[str, Any], keep: tuple[str, ...] = ()) -> bool:
    """Make ``child`` exist as ours; True when this call created it."""
    kind, name = child["kind"], child["metadata"]["name"]
    existing = ctx.cache.child(kind, key)
    if existing is None:
        try:
            ctx.cache.put(kind, await _create(ctx, child))
            return True
        except ApiError as exc:
            if exc.status != 409:
                cause = api_error_cause(exc.status, exc.message, kind, name)
                raise ChildrenBlocked(cause) from exc
        try:
            existing = await ctx.kube.get(kind, key[0], name)
        except ApiError as exc:  # deleted between the 409 and the read: the next run creates it
            raise ChildrenBlocked(api_error_cause(exc.status, exc.message, kind, name)) from exc
        if ownership(existing, sftjob) == OURS:
            ctx.cache.put(kind, existing)
            existing = ctx.cache.child(kind, key)
    if ownership(existing, sftjob) != OURS:
        raise ChildrenBlocked(conflict_cause(kind, existing, sftjob))
    if kind == "ConfigMap" and existing.get("dataDigests") is None:  # changed since we read its data (watched by metadata)
        try:
            fresh = await ctx.kube.get(kind, key[0], name)
        except ApiError as exc:
            raise ChildrenBlocked(api_error_cause(exc.status, exc.message, kind, name)) from exc
        if ownership(fresh, sftjob) != OURS:
            raise ChildrenBlocked(conflict_cause(kind, fresh, sftjob))
        ctx.cache.put(kind, fresh)
        existing = slim(kind, fresh)
    if kind == "ConfigMap":
        patch = config_map_patch(existing, child, keep)
        if patch is not None:
            log.info("SFTJob %s/%s: ConfigMap %s brought up to date", *key, name)
            ctx.cache.put(kind, await ctx.kube.patch(kind, key[0], name, patch))
    return False


async def _create(ctx: Context, child: dict[str, Any]) -> dict[str, Any]:
    """Create a child. The API server answers a ConfigMap, Service or claim with its metadata alone: the cache keeps
    nothing else of them but a ConfigMap's data, which is what was sent. A Job comes back whole (its defaults)."""
    if child["kind"] not in METADATA_CREATED:
        return await ctx.kube.create(child)
    meta = await ctx.kube.create(child, metadata_only=True)
    return {**meta, "apiVersion": child.get("apiVersion"), "kind": child["kind"], "data": child.get("data")}


async def _announce(ctx: Context, sftjob: dict[str, Any], parsed: SFTJob, warnings: list[str]) -> None:
    """On creating the Job: count it, and give the advice a person acts on as one Warning Event."""
    metrics.record_created(sftjob["metadata"]["namespace"])
    items = [str(a) for a in advise(parsed.spec)] + warnings
    if items:
        await ctx.post_event(sftjob, "Warning", "Advice", "; ".join(items))


async def _check_shared_claims(ctx: Context, sftjob: dict[str, Any], parsed: SFTJob) -> list[str]:
    """Multi-node runs mount their claims on every node. A ReadWriteOnce claim they write (the output, a
    named cache) cannot work: ChildrenBlocked, final. One they only read is warned about (Multi-Attach
    on most storage). Missing claims are left to the scheduler (Unschedulable, with its message)."""
    if parsed.spec.resources.nodes < 2:
        return []  # (no read needed)
    names = set(pvc_claims(parsed)) | {cache_claim(parsed)} - {None}
    found = {}
    for claim in sorted(names):
        try:
            found[claim] = await ctx.kube.get("PersistentVolumeClaim", sftjob["metadata"]["namespace"], claim)
        except ApiError:
            continue
    failure, warnings = shared_claims_check(parsed, found)
    if failure is not None:
        raise ChildrenBlocked(failure)
    return warnings


async def _finished(ctx: Context, key: Key, sftjob: dict[str, Any], status: dict[str, Any]) -> None:
    """A finished SFTJob: its failed Job keeps no pods; ttlSecondsAfterFinished is (re-)armed."""
    if status.get("phase") == Phase.failed.value:
        reason = (condition(status, "Failed") or {}).get("reason", "Failed")
        patch = stop_patch(ctx.cache.job_of(key), reason)
        if patch is not None:
            try:
                ctx.cache.put("Job", await ctx.kube.patch("Job", key[0], ctx.cache.job_of(key)["metadata"]["name"], patch))
                log.info("SFTJob %s/%s failed (%s): its Job is suspended, so its pods release their GPUs", *key, reason)
                ctx.scheduler.succeeded(key, "manage")
            except ApiError as exc:
                delay = ctx.scheduler.failed(key, "manage")
                log.warning("SFTJob %s/%s: could not stop its Job (%s); retrying in %.0fs", *key, exc, delay)
                ctx.kick(key, delay)
                return
        if not await _keep_unexported_model(ctx, key, sftjob, status):
            return
    ctx.cache.note(key).finished = managed_as(ctx, sftjob)  # done for this spec (a TTL edit changes it)
    ttl = ((sftjob.get("spec") or {}).get("runPolicy") or {}).get("ttlSecondsAfterFinished")
    if ttl is None:
        ctx.scheduler.cancel(key, "ttl")
        return
    finished = parse_time(status.get("completionTime"))
    delay = max(0.0, (finished.timestamp() if finished else time.time()) + ttl - time.time())
    uid = sftjob["metadata"]["uid"]
    ctx.scheduler.at(key, "ttl", delay, lambda: _delete_after_ttl(ctx, key, uid), earliest=False)


async def _keep_unexported_model(ctx: Context, key: Key, sftjob: dict[str, Any], status: dict[str, Any]) -> bool:
    """A failed job that trained through its last step and lost only the export: its cache claim holds the
    model. Release the claim from the SFTJob, so that deleting the SFTJob never deletes that model, and say
    how to export or discard it. False when the API call failed (retried with back-off)."""
    claim_name = unexported_model(sftjob, status)
    if claim_name is None:
        return True
    try:
        claim = await ctx.kube.get("PersistentVolumeClaim", key[0], claim_name)
        patch = keep_claim_patch(claim, sftjob)
        if patch is None:
            return True
        await ctx.kube.patch("PersistentVolumeClaim", key[0], claim_name, patch)
    except ApiError as exc:
        if exc.status == 404:
            return True
        delay = ctx.scheduler.failed(key, "manage")
        log.warning("SFTJob %s/%s: could not keep its unexported model's claim %s (%s); retrying in %.0fs",
                    *key, claim_name, exc, delay)
        ctx.kick(key, delay)
        return False
    destination = sftjob["spec"]["output"]["destination"]
    log.info("SFTJob %s/%s: trained model not exported; claim %s released from the SFTJob and kept", *key, claim_name)
    await ctx.post_event(sftjob, "Warning", "ModelKept", (
        f"training finished but the export to {destination} failed; the trained model is kept on "
        f"PersistentVolumeClaim {claim_name}, which deleting this SFTJob no longer deletes. To export it, apply an "
        f"SFTJob with output.destination {destination} and storage.cache.claimName {claim_name}: it exports "
        f"without training. To discard it: kubectl delete pvc {claim_name}"))
    return True


async def _delete_after_ttl(ctx: Context, key: Key, uid: str) -> None:
    log.info("SFTJob %s/%s: ttlSecondsAfterFinished passed, deleting it", *key)
    try:
        await ctx.kube.delete_sftjob(key[0], key[1], uid)
    except ApiError as exc:
        delay = ctx.scheduler.failed(key, "manage")
        log.warning("SFTJob %s/%s: delete after TTL failed (%s); retrying in %.0fs", *key, exc, delay)
        ctx.scheduler.at(key, "ttl", delay, lambda: _delete_after_ttl(ctx, key, uid), earliest=False)

