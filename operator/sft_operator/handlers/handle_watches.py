"""Watch SFTJobs and the objects labelled with their name; every change feeds the cache and asks for
a reconcile (``manage``) and a status write (``writer``). Nothing here waits for either.

Plain event watchers: Kopf stores nothing on the objects (no finalizer, no annotation patch). The
children and pods are matched to their SFTJob by the ``sft.dev/job-name`` label the renderer puts
on all of them; the watches carry that label as a server-side selector (``main.configure``), so the
operator never streams unrelated pods or ConfigMaps.
"""

from __future__ import annotations

from typing import Any

import kopf

from .. import GROUP, PLURAL, VERSION
from ..context import Context
from ..manage import converged
from ..render import LABEL_JOB


@kopf.on.event(GROUP, VERSION, PLURAL)
async def sftjob_event(event: dict[str, Any], body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    ctx: Context = memo.ctx
    if event.get("type") == "DELETED":
        uid = body["metadata"].get("uid")
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if (ctx.cache.sftjobs.get(key) or {}).get("metadata", {}).get("uid") in (uid, None):
            ctx.forget(key)
        return
    echo = ctx.cache.is_echo(body)  # our own status write: nothing to derive again
    key = ctx.cache.put("SFTJob", body)
    if key is None:
        return
    if not converged(ctx, key):
        ctx.kick(key)
    if not echo:
        ctx.writer.mark(key)


def child_event(ctx: Context, kind: str, event: dict[str, Any], body: kopf.Body) -> None:
    if event.get("type") == "DELETED":
        key = ctx.cache.drop(kind, body)
        if key is not None and kind != "Pod":
            ctx.kick(key)  # level-triggered: the spec still wants it (unless the job is finished)
    else:
        key = ctx.cache.put(kind, body)
    if key is not None and key in ctx.cache.sftjobs:
        ctx.writer.mark(key)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_JOB: kopf.PRESENT})
async def job_event(event: dict[str, Any], body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    child_event(memo.ctx, "Job", event, body)


@kopf.on.event("", "v1", "pods", labels={LABEL_JOB: kopf.PRESENT})
async def pod_event(event: dict[str, Any], body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    child_event(memo.ctx, "Pod", event, body)


@kopf.on.event("", "v1", "configmaps", labels={LABEL_JOB: kopf.PRESENT})
async def config_map_event(event: dict[str, Any], body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    child_event(memo.ctx, "ConfigMap", event, body)


@kopf.on.event("", "v1", "services", labels={LABEL_JOB: kopf.PRESENT})
async def service_event(event: dict[str, Any], body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    child_event(memo.ctx, "Service", event, body)
