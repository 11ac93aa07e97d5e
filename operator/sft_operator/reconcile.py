"""Pure decisions of the reconcile loop: adoption, suspension, API errors (no I/O).

The handlers in ``sft_operator.handlers`` fetch and write; these functions decide.
"""

from __future__ import annotations

import json
from typing import Any

from . import API_VERSION, KIND
from .render import LABEL_KUEUE_QUEUE
from .status import Cause

# On a Job the operator suspended: only then does it resume the Job (a queue controller such as
# Kueue suspends and resumes queued Jobs itself, and the operator must not overrule it).
ANNOTATION_SUSPENDED_BY = "sft.dev/suspended-by"
SUSPENDED_BY_OPERATOR = "sft-operator"
# Set when the operator stops a Job whose SFTJob it declared Failed (an image that never pulls).
ANNOTATION_STOPPED_REASON = "sft.dev/stopped-reason"


def owner_reference(sftjob: dict[str, Any]) -> dict[str, Any]:
    meta = sftjob["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def controller_of(obj: dict[str, Any]) -> dict[str, Any] | None:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref
    return None


def adoption_patch(child: dict[str, Any], sftjob: dict[str, Any]) -> dict[str, Any] | None:
    """The metadata patch that makes ``sftjob`` the controller of an existing ``child``.

    None when it already is. Raises ChildConflict when another object controls the child
    (e.g. the Job of a deleted SFTJob of the same name that garbage collection has not removed yet).
    """
    ours = owner_reference(sftjob)
    current = controller_of(child)
    if current is not None:
        if current.get("uid") == ours["uid"]:
            return None
        raise ChildConflict(
            f"{child.get('kind', 'object')} {child['metadata']['name']} is controlled by "
            f"{current.get('kind')} {current.get('name')} (uid {current.get('uid')}); waiting for it to go"
        )
    refs = list((child.get("metadata") or {}).get("ownerReferences") or [])
    refs = [r for r in refs if r.get("uid") != ours["uid"]] + [ours]
    return {"metadata": {"ownerReferences": refs}}


class ChildConflict(Exception):
    """A child of ours exists under another controller."""


def suspend_patch(want_suspended: bool, job: dict[str, Any]) -> dict[str, Any] | None:
    """The Job patch that applies ``runPolicy.suspend``; None when nothing is to change.

    Only ``spec.suspend`` and our own annotation are touched. Suspending always applies.
    Resuming applies unless a queue controller (Kueue label) holds the Job and we did not suspend it.
    """
    meta = job.get("metadata") or {}
    suspended = bool((job.get("spec") or {}).get("suspend"))
    ours = (meta.get("annotations") or {}).get(ANNOTATION_SUSPENDED_BY) == SUSPENDED_BY_OPERATOR
    if want_suspended:
        if suspended and ours:
            return None
        if suspended:  # suspended by the queue: claim it, so that resuming is ours to do
            return {"metadata": {"annotations": {ANNOTATION_SUSPENDED_BY: SUSPENDED_BY_OPERATOR}}}
        return {
            "metadata": {"annotations": {ANNOTATION_SUSPENDED_BY: SUSPENDED_BY_OPERATOR}},
            "spec": {"suspend": True},
        }
    if not suspended:
        return {"metadata": {"annotations": {ANNOTATION_SUSPENDED_BY: None}}} if ours else None
    queued = LABEL_KUEUE_QUEUE in (meta.get("labels") or {})
    if queued and not ours:
        return None  # the queue admits it
    return {"metadata": {"annotations": {ANNOTATION_SUSPENDED_BY: None}}, "spec": {"suspend": False}}


def prepare_job(job: dict[str, Any]) -> dict[str, Any]:
    """A rendered Job ready to create: when it starts suspended, mark the suspension as ours."""
    if (job.get("spec") or {}).get("suspend"):
        meta = job.setdefault("metadata", {})
        meta.setdefault("annotations", {})[ANNOTATION_SUSPENDED_BY] = SUSPENDED_BY_OPERATOR
    return job


def api_error_cause(status: int | None, body: str | bytes | None, kind: str, name: str) -> Cause:
    """A failed create call as a status reason and the API server's own message."""
    message = ""
    try:
        message = json.loads(body or "{}").get("message", "")
    except (ValueError, AttributeError):
        message = (body.decode() if isinstance(body, bytes) else body or "").strip()
    message = message or f"HTTP {status}"
    if status == 403 and "exceeded quota" in message:
        reason = "QuotaExceeded"
    elif status == 403:
        reason = "Forbidden"
    elif status == 422:
        reason = "Invalid"
    elif status == 404:
        reason = "NotFound"
    else:
        reason = "CreateFailed"
    return Cause(reason, f"creating {kind} {name}: {message}")


def retry_delay(retry: int) -> float:
    """Back-off for failed child creation: 5 s doubling to 5 minutes."""
    return float(min(300, 5 * 2 ** min(retry, 6)))
