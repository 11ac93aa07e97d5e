"""The words every part of the status uses: phases, condition types, the reasons that fail a job at
creation, a Cause, an Observation, times (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sft_operator.api.types import ConditionType, Phase

PENDING = Phase.pending.value
QUEUED = Phase.queued.value
RUNNING = Phase.running.value
RESTARTING = Phase.restarting.value
SUSPENDED = Phase.suspended.value
SUCCEEDED = Phase.succeeded.value
FAILED = Phase.failed.value
CONDITION_TYPES = tuple(c.value for c in ConditionType)
CREATED = ConditionType.created.value
QUEUED_C = ConditionType.queued.value
SUSPENDED_C = ConditionType.suspended.value
RUNNING_C = ConditionType.running.value
RESTARTING_C = ConditionType.restarting.value
SUCCEEDED_C = ConditionType.succeeded.value
FAILED_C = ConditionType.failed.value
NAME_CONFLICT = "NameConflict"
INVALID_SPEC = "InvalidSpec"
READ_WRITE_ONCE_CLAIM = "ReadWriteOnceClaim"  # nodes > 1 would write a claim only one node can mount
# Child-creation causes that no retry can fix: the job fails with them.
FINAL_CREATION_REASONS = frozenset({NAME_CONFLICT, INVALID_SPEC, READ_WRITE_ONCE_CLAIM})
MAX_MESSAGE = 2048  # keep status small; the full text is in the pod


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def format_time(value: datetime) -> str:
    return value.astimezone(timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


@dataclass(frozen=True)
class Cause:
    """Why something is (or is not) happening: a CamelCase reason and a message for people."""

    reason: str
    message: str
    since: datetime | None = None  # when it began, where that counts (a pod's volume problem)

    @property
    def final(self) -> bool:
        return self.reason in FINAL_CREATION_REASONS


def as_int(value: Any) -> int:
    return int(value) if isinstance(value, int) else 0


@dataclass(frozen=True)
class Observation:
    """What the cluster says about one SFTJob, in one phase with its reason."""

    phase: str
    reason: str
    message: str
    restarts: int = 0
    created: Cause | None = None  # None: the children exist
    running_pods: int = 0
