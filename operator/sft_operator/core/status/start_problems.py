"""Why a scheduled pod does not start its trainer (an image that does not pull, a container the kubelet
cannot create, a volume that cannot be mounted), for how long, and which events would tell (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sft_operator.core.status.pods import is_active, job_condition, past_init, pod_condition
from sft_operator.core.status.vocabulary import Cause, clip, parse_time

IMAGE_PULL_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
# A container the kubelet cannot create (e.g. a secretKeyRef naming a missing key): it never starts.
CONTAINER_CONFIG_REASONS = frozenset({"CreateContainerConfigError", "CreateContainerError"})
# Pod events that keep a scheduled pod in ContainerCreating: a volume that cannot be mounted or attached.
VOLUME_EVENT_REASONS = frozenset({"FailedMount", "FailedAttachVolume"})
# Pod events that come only once the volumes are attached or mounted: a volume problem before them is over.
VOLUME_DONE_REASONS = frozenset({"SuccessfulAttachVolume", "SuccessfulMountVolume", "Pulling", "Pulled", "Created",
                                 "Started"})
# The kinds of start problem, each timed on its own per pod: an image that does not pull, a container the
# kubelet cannot create, a volume that cannot be attached or mounted.
IMAGE = "image"
CONFIG = "config"
VOLUME = "volume"
IMAGE_PULL_FAILED = "ImagePullFailed"
MULTI_ATTACH = "MultiAttach"
POD_EVENTS_AFTER_SECONDS = 10.0  # a scheduled pod not started this long: read its events (FailedMount, ...)
JOB_EVENTS_AFTER_SECONDS = 10.0  # a Job without pods this long: read its FailedCreate events
LOOKUP_AGAIN_SECONDS = 30.0


@dataclass(frozen=True)
class StartProblem:
    """Why a scheduled pod's trainer does not start, and for how long."""

    reason: str  # as the kubelet says it: ErrImagePull, CreateContainerConfigError, FailedMount, MultiAttach, ...
    failed_reason: str  # the reason once the grace period is over: ImagePullFailed, or the same
    message: str
    since: datetime  # when this problem of this pod began
    seconds: float  # how long it has lasted


def _scheduled_since(pod: dict[str, Any]) -> datetime | None:
    scheduled = pod_condition(pod, "PodScheduled") or {}
    return parse_time(scheduled.get("lastTransitionTime")) or parse_time(pod.get("metadata", {}).get("creationTimestamp"))


def volume_cause(reason: str, message: str, since: datetime | None = None) -> Cause:
    """A FailedMount / FailedAttachVolume pod event as a reason (Multi-Attach named as such)."""
    if reason == "FailedAttachVolume" and "Multi-Attach" in message:
        reason = MULTI_ATTACH
    return Cause(reason, clip(message), since)


def _event_time(event: dict[str, Any], first: bool) -> datetime | None:
    """When an event was first or last seen. A repeated event is one object: core/v1 keeps firstTimestamp and
    lastTimestamp (the kubelet's events), events.k8s.io eventTime and series.lastObservedTime."""
    firsts = [event.get("firstTimestamp"), event.get("eventTime")]
    lasts = [(event.get("series") or {}).get("lastObservedTime"), event.get("lastTimestamp")]
    return next((parse_time(t) for t in (firsts + lasts if first else lasts + firsts[::-1]) if t), None)


def volume_problem(events: list[dict[str, Any]]) -> Cause | None:
    """A pod's volume problem, read from its events: the newest FailedMount or FailedAttachVolume warning,
    since the first of them (the API server keeps when a repeated event began, so an operator restart loses
    nothing). None when there is none, or when a later event shows the pod moved on: attached, mounted,
    pulling its image, started."""
    never = datetime.min.replace(tzinfo=timezone.utc)
    done = max((_event_time(e, False) or never for e in events if e.get("reason") in VOLUME_DONE_REASONS), default=never)
    volume = [e for e in events if e.get("reason") in VOLUME_EVENT_REASONS and e.get("type") == "Warning"
              and (_event_time(e, False) or never) > done]
    if not volume:
        return None
    newest = max(volume, key=lambda e: _event_time(e, False) or never)
    began = min(_event_time(e, True) or never for e in volume)
    since = max(began, done) if began > never else None  # a problem after progress began after it
    return volume_cause(newest["reason"], newest.get("message", ""), since)


def _starting(pod: dict[str, Any]) -> bool:
    """Active and not running yet: what a start problem can hold up."""
    return is_active(pod) and (pod.get("status") or {}).get("phase") != "Running"


def container_problems(pod: dict[str, Any]) -> dict[str, Cause]:
    """The start problems a pod's container states show now, by kind (IMAGE, CONFIG); init containers first."""
    out: dict[str, Cause] = {}
    pod_status = pod.get("status") or {}
    for status in (pod_status.get("initContainerStatuses") or []) + (pod_status.get("containerStatuses") or []):
        waiting = (status.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        if reason in IMAGE_PULL_REASONS:
            out.setdefault(IMAGE, Cause(reason, clip(f"image {status.get('image', '')}: {waiting.get('message') or reason}")))
        elif reason in CONTAINER_CONFIG_REASONS:
            name = pod.get("metadata", {}).get("name", "?")
            out.setdefault(CONFIG, Cause(reason, clip(f"pod {name}: {waiting.get('message') or reason}")))
    return out


def track_start_clocks(pods: list[dict[str, Any]], clocks: Mapping[tuple[str, str], datetime],
                       now: datetime) -> dict[tuple[str, str], datetime]:
    """When each start problem that a container state shows began, by (pod uid, kind). The API keeps no time
    for a waiting state, so it is when the operator first saw it (``now`` then); it keeps its time while the
    problem lasts (the kubelet shows ErrImagePull or ImagePullBackOff all through a retried pull) and is
    dropped once the pod moved on (pulled, created, running), so the next problem starts a new clock."""
    out: dict[tuple[str, str], datetime] = {}
    for pod in pods:
        if _starting(pod):
            uid = pod.get("metadata", {}).get("uid", "")
            for kind in container_problems(pod):
                out[(uid, kind)] = clocks.get((uid, kind), now)
    return out


def start_problem(
    pods: list[dict[str, Any]], now: datetime, pod_problems: Mapping[str, Cause] | None = None,
    clocks: Mapping[tuple[str, str], datetime] | None = None,
) -> StartProblem | None:
    """The longest-lasting reason an active pod cannot start its trainer: an image that does not pull or a
    container the kubelet cannot create (timed by ``clocks``, from ``track_start_clocks``), or a volume it
    cannot attach or mount (``pod_problems``, by pod uid, from ``volume_problem``). A volume problem no
    longer counts once the pod is past it: an init container started, or a container state shows a later
    problem. A problem without a known start counts from ``now``."""
    worst: StartProblem | None = None
    for pod in pods:
        if not _starting(pod):
            continue
        uid = pod.get("metadata", {}).get("uid", "")
        found = {kind: (cause, (clocks or {}).get((uid, kind)) or now) for kind, cause in container_problems(pod).items()}
        volume = (pod_problems or {}).get(uid)
        if volume is not None and not found and not past_init(pod):
            found[VOLUME] = (volume, volume.since or now)
        for kind, (cause, since) in found.items():
            problem = StartProblem(reason=cause.reason, failed_reason=IMAGE_PULL_FAILED if kind == IMAGE else cause.reason,
                                   message=cause.message, since=since, seconds=max(0.0, (now - since).total_seconds()))
            if worst is None or problem.seconds > worst.seconds:
                worst = problem
    return worst


def recheck_seconds(pods: list[dict[str, Any]], now: datetime, grace_seconds: float,
                    pod_problems: Mapping[str, Cause] | None = None,
                    clocks: Mapping[tuple[str, str], datetime] | None = None) -> float | None:
    """When a pod that cannot start runs out of its grace period: derive again then."""
    problem = start_problem([p for p in pods if is_active(p)], now, pod_problems, clocks)
    return None if problem is None else max(0.0, grace_seconds - problem.seconds)


@dataclass(frozen=True)
class Lookup:
    """An object whose events would explain a stuck job, and in how many seconds to read them."""

    kind: str  # "Job" (FailedCreate: no pods) or "Pod" (FailedMount, FailedAttachVolume)
    name: str
    uid: str
    after_seconds: float


def lookups(job: dict[str, Any] | None, pods: list[dict[str, Any]], now: datetime) -> list[Lookup]:
    """Events worth reading: a running Job without pods, a scheduled pod whose trainer has not started."""
    if job is None or (job.get("spec") or {}).get("suspend") or job_condition(job, "Complete") or job_condition(job, "Failed"):
        return []
    meta = job.get("metadata") or {}
    out: list[Lookup] = []
    active = [p for p in pods if is_active(p)]
    if not active:
        created = parse_time(meta.get("creationTimestamp"))
        age = (now - created).total_seconds() if created else JOB_EVENTS_AFTER_SECONDS
        out.append(Lookup(kind="Job", name=meta.get("name", ""), uid=meta.get("uid", ""),
                          after_seconds=max(0.0, JOB_EVENTS_AFTER_SECONDS - age)))
    for pod in active:
        scheduled = pod_condition(pod, "PodScheduled") or {}
        if (pod.get("status") or {}).get("phase") != "Pending" or scheduled.get("status") != "True" or past_init(pod):
            continue
        since = _scheduled_since(pod)
        age = (now - since).total_seconds() if since else 0.0
        pmeta = pod.get("metadata") or {}
        out.append(Lookup(kind="Pod", name=pmeta.get("name", ""), uid=pmeta.get("uid", ""),
                          after_seconds=max(0.0, POD_EVENTS_AFTER_SECONDS - age)))
    return out
