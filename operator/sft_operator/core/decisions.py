"""Pure decisions of reconciling: whose a child is, what to patch, what an API error means (no I/O).

``sft_operator.runtime.reconcile`` fetches and writes; these functions decide.

The operator adopts nothing. A child name that is taken by an object this SFTJob does not control
is a ``NameConflict``, and the object is never touched: it may be someone's production Service
(deleting the SFTJob would garbage-collect an adopted one), or the orphaned child of an earlier
SFTJob of the same name (its old config or its old Complete condition would be reused). Adopting
would also need ``delete`` on ConfigMaps, Services and Jobs under OwnerReferencesPermissionEnforcement.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from sft_contract.spec import cluster_problems
from sft_operator.api import API_VERSION, KIND
from sft_operator.api.types import SFTJob, SFTJobSpec
from sft_operator.core.render import CA_KEY, LABEL_KUEUE_QUEUE, cache_claim, cache_claim_name, pvc_claim, pvc_claims
from sft_operator.core.status import INVALID_SPEC, NAME_CONFLICT, READ_WRITE_ONCE_CLAIM, Cause, job_condition

# On a Job the operator suspended: only then does it resume the Job (a queue controller such as
# Kueue suspends and resumes queued Jobs itself, and the operator must not overrule it).
ANNOTATION_SUSPENDED_BY = "sft.dev/suspended-by"
SUSPENDED_BY_OPERATOR = "sft-operator"
# Set when the operator stops the Job of an SFTJob it declared Failed (e.g. an image that never pulls).
ANNOTATION_STOPPED_REASON = "sft.dev/stopped-reason"
# On a cache claim released from its failed SFTJob because it holds a trained model never exported: the run id.
ANNOTATION_KEPT_FOR_EXPORT = "sft.dev/kept-for-export"
AWAITING_GC = "AwaitingGarbageCollection"
CONFIG_KEY = "config.json"
CONFIG_MAP_KEYS = (CONFIG_KEY, CA_KEY)  # every key the renderer may write

OURS, PREVIOUS, FOREIGN = "ours", "previous", "foreign"
READ_WRITE_ONCE = frozenset({"ReadWriteOnce", "ReadWriteOncePod"})


def data_digests(data: Mapping[str, Any] | None) -> dict[str, str]:
    """A short fingerprint of each key of a ConfigMap's data: the renderer's and the cluster's compare
    equal, and a running job's config.json can be kept while its CA is brought up to date."""
    return {key: hashlib.sha256(json.dumps(value).encode()).hexdigest()[:32] for key, value in (data or {}).items()}


def controller_of(obj: Mapping[str, Any] | None) -> dict[str, Any] | None:
    for ref in ((obj or {}).get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref
    return None


def ownership(child: dict[str, Any], sftjob: dict[str, Any]) -> str:
    """OURS: this SFTJob controls it. PREVIOUS: a deleted SFTJob of the same name controls it, and
    garbage collection will remove it. FOREIGN: anything else (no controller, another controller)."""
    ref = controller_of(child)
    meta = sftjob["metadata"]
    if ref is None:
        return FOREIGN
    if ref.get("uid") == meta.get("uid"):
        return OURS
    if ref.get("kind") == KIND and ref.get("apiVersion") == API_VERSION and ref.get("name") == meta["name"]:
        return PREVIOUS
    return FOREIGN


def conflict_cause(kind: str, child: dict[str, Any], sftjob: dict[str, Any]) -> Cause:
    """Why an existing object with a child's name stops this SFTJob (final) or makes it wait."""
    meta = child.get("metadata") or {}
    where = f"{kind} {meta.get('namespace', '')}/{meta.get('name', '')}"
    if ownership(child, sftjob) == PREVIOUS:
        old = controller_of(child) or {}
        return Cause(AWAITING_GC, f"{where} still belongs to an earlier SFTJob of this name (uid {old.get('uid')}); "
                                  "waiting for garbage collection to remove it")
    ref = controller_of(child)
    owner = f"controlled by {ref.get('kind')} {ref.get('name')}" if ref else "not created by this SFTJob"
    return Cause(NAME_CONFLICT, f"{where} already exists and is {owner}; the operator leaves it alone. "
                                "Rename or delete it, or give the SFTJob another name")


def wanted_digests(existing: dict[str, Any] | None, rendered: dict[str, Any], keep: tuple[str, ...]) -> dict[str, str]:
    """The per-key digests our ConfigMap should have: the renderer's, except the ``keep`` keys, which stay
    as the ConfigMap has them (a running job's config.json: it keeps the config it started with)."""
    want = data_digests(rendered.get("data"))
    have = (existing or {}).get("dataDigests") or {}
    for key in keep:
        if key in have:
            want[key] = have[key]
    return want


def config_map_patch(existing: dict[str, Any], rendered: dict[str, Any], keep: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """The patch that brings our ConfigMap's data back to what the renderer says (a rotated CA, an edit),
    leaving the ``keep`` keys alone; None when nothing differs."""
    have = existing.get("dataDigests") or {}
    want = wanted_digests(existing, rendered, keep)
    if have == want:
        return None
    data = rendered.get("data") or {}
    patch = {k: data[k] for k in want if k not in keep and have.get(k) != want[k]}
    patch.update({k: None for k in have if k not in want and k in CONFIG_MAP_KEYS})
    return {"data": patch}


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


def stop_patch(job: dict[str, Any] | None, reason: str) -> dict[str, Any] | None:
    """For the Job of a Failed SFTJob: suspend it so that its pods (and GPUs) go; None when the Job
    has finished or is stopped already. The Job controller never gives up on, e.g., an image pull."""
    if job is None or job_condition(job, "Complete") or job_condition(job, "Failed"):
        return None
    if (job.get("spec") or {}).get("suspend"):
        return None
    return {
        "metadata": {"annotations": {ANNOTATION_SUSPENDED_BY: SUSPENDED_BY_OPERATOR, ANNOTATION_STOPPED_REASON: reason}},
        "spec": {"suspend": True},
    }


def unexported_model(sftjob: dict[str, Any], status: dict[str, Any]) -> str | None:
    """The cache claim that holds a failed SFTJob's trained but never exported model, or None.

    The model of an s3:// output is staged on the operator's cache claim (``<job>-cache``) and its marker
    ``.sft/export-pending/<uid>.json`` written there before the upload; a job that trained through its
    last step and still failed lost only the export. A claim the spec names is the user's and never
    garbage-collected, so there is nothing to keep."""
    spec = sftjob.get("spec") or {}
    progress = status.get("progress") or {}
    if status.get("phase") != "Failed" or not str((spec.get("output") or {}).get("destination", "")).startswith("s3://"):
        return None
    if not progress.get("totalSteps") or progress.get("step") != progress.get("totalSteps"):
        return None
    if ((spec.get("storage") or {}).get("cache") or {}).get("claimName"):
        return None
    return cache_claim_name(sftjob["metadata"]["name"])


def keep_claim_patch(claim: dict[str, Any], sftjob: dict[str, Any]) -> dict[str, Any] | None:
    """Release our cache claim from the SFTJob (no ownerReference: garbage collection keeps it when the SFTJob is
    deleted) and mark whose model it keeps; None when it is not ours (already released, or someone else's)."""
    if ownership(claim, sftjob) != OURS:
        return None
    return {"metadata": {"ownerReferences": None,
                         "annotations": {ANNOTATION_KEPT_FOR_EXPORT: sftjob["metadata"]["uid"]}}}


def prepare_job(job: dict[str, Any]) -> dict[str, Any]:
    """A rendered Job ready to create: when it starts suspended, mark the suspension as ours."""
    if (job.get("spec") or {}).get("suspend"):
        meta = job.setdefault("metadata", {})
        meta.setdefault("annotations", {})[ANNOTATION_SUSPENDED_BY] = SUSPENDED_BY_OPERATOR
    return job


def api_error_cause(status: int, message: str, kind: str, name: str) -> Cause:
    """A failed create as a status reason with the API server's own message. 422 (the server says
    the object is invalid) is final: no retry makes it valid."""
    message = message or f"HTTP {status}"
    if status == 403 and "exceeded quota" in message:
        reason = "QuotaExceeded"
    elif status == 403:
        reason = "Forbidden"
    elif status == 422:
        reason = INVALID_SPEC
    elif status == 404:
        reason = "NotFound"
    else:
        reason = "CreateFailed"
    return Cause(reason, f"creating {kind} {name}: {message}")


def local_output_cause(spec: SFTJobSpec) -> Cause | None:
    """A local output path would land in the pod's scratch space and vanish with it: refused (final).
    Not a CRD rule, since the same manifest is right for ``sftctl run`` on a laptop."""
    problems = cluster_problems(spec)
    if not problems:
        return None
    return Cause(INVALID_SPEC, "; ".join(f"{field}: {message}" for field, message in problems))


def access_modes(claim: dict[str, Any]) -> set[str]:
    """What a claim can do: its bound volume's modes, else what it asks for."""
    return set((claim.get("status") or {}).get("accessModes") or (claim.get("spec") or {}).get("accessModes") or [])


def shared_claims_check(job: SFTJob, claims: dict[str, dict[str, Any]]) -> tuple[Cause | None, list[str]]:
    """For a multi-node run and the claims it mounts (name -> the claim as read; missing ones left out):
    the failure for a ReadWriteOnce claim its pods write (the output, a named cache), and warnings for
    ReadWriteOnce claims they only read. Pods on other nodes cannot attach a ReadWriteOnce volume."""
    spec = job.spec
    nodes = spec.resources.nodes
    if nodes < 2:
        return None, []
    written: dict[str, str] = {}
    out_claim = pvc_claim(spec.output.destination)
    if out_claim:
        written[out_claim] = "spec.output.destination"
    cache = cache_claim(job)
    if cache and spec.storage and spec.storage.cache and spec.storage.cache.claim_name == cache:
        written.setdefault(cache, "spec.storage.cache.claimName")
    fixes = {
        "spec.output.destination": "or write the output to s3://<bucket>/<prefix>",
        "spec.storage.cache.claimName": "or set spec.storage.cache.size instead, and the operator creates a "
                                        "ReadWriteMany cache claim for the job",
    }
    failures, warnings = [], []
    for name in sorted(set(pvc_claims(job)) | set(written)):
        claim = claims.get(name)
        modes = access_modes(claim) if claim is not None else set()
        if not modes or not modes <= READ_WRITE_ONCE:
            continue
        shown = "/".join(sorted(modes))
        if name in written:
            field = written[name]
            failures.append(f"{field}: PersistentVolumeClaim {name} is {shown}, but spec.resources.nodes is {nodes} "
                            f"and the pods on every node write to it; use a ReadWriteMany claim, {fixes[field]}")
        else:
            warnings.append(f"spec.resources.nodes: {nodes} nodes share PersistentVolumeClaim {name}, which is "
                            f"{shown}: the pods on other nodes cannot attach it (Multi-Attach); use a ReadWriteMany "
                            "(or ReadOnlyMany) claim")
    failure = Cause(READ_WRITE_ONCE_CLAIM, "; ".join(failures)) if failures else None
    return failure, warnings
