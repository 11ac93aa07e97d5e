"""Watch SFTJobs; every change feeds the cache and asks for a reconcile (``manage``) and a status write
(``writer``). Nothing here waits for either.

A plain event watcher: Kopf stores nothing on the SFTJobs (no finalizer, no annotation patch). The
children and pods are watched by ``sft_operator.watch`` (one list-then-watch per kind, fed straight
into the cache).
"""

from __future__ import annotations

from typing import Any

import kopf

from .. import GROUP, PLURAL, VERSION
from ..context import Context
from ..manage import converged


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
