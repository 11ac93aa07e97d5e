"""Events on an SFTJob, posted by the writer and the reconciler alike."""

from __future__ import annotations

import logging
from typing import Any, Protocol

from sft_operator.runtime.client import ApiError

log = logging.getLogger("sft_operator")


class EventPoster(Protocol):
    async def post_event(self, involved: dict[str, Any], kind: str, reason: str, message: str) -> None: ...


async def post_event(kube: EventPoster, sftjob: dict[str, Any], kind: str, reason: str, message: str) -> None:
    """An Event on the SFTJob; losing one is logged, never fatal."""
    try:
        await kube.post_event(sftjob, kind, reason, message)
    except ApiError as exc:
        log.warning("Event %s on SFTJob %s/%s not posted: %s", reason, sftjob["metadata"].get("namespace"),
                    sftjob["metadata"].get("name"), exc)
