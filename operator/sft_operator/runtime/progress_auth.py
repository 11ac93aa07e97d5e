"""Who may report progress for an SFTJob: the progress endpoint's authentication (KEP-2779).

A trainer pod's projected service-account token (audience ``settings.token_audience``) is

1. refused at once when its own claims already refuse it (``precheck``: not a JWT, not our
   audience, expired, another namespace, not bound to a pod); these claims are unverified, so they
   can only ever refuse and a forger gains nothing from them; they cost no TokenReview;
2. authenticated with a TokenReview bound to our audience (``KubernetesVerifier``);
3. accepted only for a pod of that very SFTJob: a service account of ``{ns}``, the pod named in the
   token (uid matching) carries ``sft.dev/job-name={name}`` and is owned by the Job that the SFTJob
   ``{ns}/{name}`` controls (uids checked along the chain).

Verifications are cached (``VerificationCache``: successes for a minute, refusals for
``FAILURE_TTL_SECONDS``); each source address may cause ``SourceLimiter``'s burst of TokenReviews,
then one per second (429 with Retry-After beyond); at most ``VERIFY_CONCURRENCY`` run at once and
at most ``VERIFY_QUEUE`` wait, beyond that the endpoint answers 503 at once. Junk traffic therefore
cannot fill the verification slots that real trainers need.

The HTTP side (routes, body limits, handing reports to the status writer) is
``sft_operator.runtime.progress_server``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sft_operator.api import GROUP, KIND, VERSION
from sft_operator.core.decisions import controller_of
from sft_operator.core.render import LABEL_JOB
from sft_operator.runtime.client import ApiError, KubeClient

if TYPE_CHECKING:
    from sft_operator.runtime.cache import Cache

CACHE_TTL_SECONDS = 60.0
FAILURE_TTL_SECONDS = 10.0  # a refused token is refused again without a TokenReview for this long
CACHE_MAX_ENTRIES = 4096
VERIFY_CONCURRENCY = 4  # TokenReviews (and reads) in flight for the endpoint; the rest of the slots write status
VERIFY_QUEUE = 64  # verifications allowed to wait; more get 503 at once
# TokenReviews one source address may cause: a burst, then this many per second. A trainer pod needs one
# a minute (successes are cached), plus one when its token rotates.
SOURCE_REVIEWS_PER_SECOND = 1.0
SOURCE_REVIEW_BURST = 10
SOURCE_MAX_TRACKED = 4096
MAX_TOKEN_CHARS = 8 * 1024  # projected service-account tokens are about 1 KiB
CLOCK_SKEW_SECONDS = 60.0  # an expired token within this much of our clock still goes to the TokenReview
_JWT = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"

log = logging.getLogger(__name__)


class Rejected(Exception):
    """A request the endpoint refuses; `status` is the HTTP status, `reason` one CamelCase word,
    `retry_after` the seconds a 429 asks the caller to wait."""

    def __init__(self, status: int, reason: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True)
class Caller:
    """A verified trainer pod, allowed to report for `namespace/job`."""

    namespace: str
    job: str
    pod_name: str
    pod_uid: str
    username: str
    expires_at: float | None = None  # the token's `exp` (epoch seconds), when known
    sftjob_uid: str = ""  # the SFTJob the pod belongs to: a report never reaches a re-created one


# (token, namespace, sftjob name) -> the verified caller, or raise Rejected.
Verifier = Callable[[str, str, str], Awaitable[Caller]]


# ---- the token's own claims ------------------------------------------------------------------


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _jwt_part(token: str, index: int) -> dict[str, Any] | None:
    try:
        part = token.split(".")[index]
        part += "=" * (-len(part) % 4)
        value = json.loads(base64.urlsafe_b64decode(part))
    except (IndexError, ValueError, UnicodeDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def unverified_claims(token: str) -> dict[str, Any]:
    """The JWT payload without checking the signature: for messages, cache expiry and refusals
    (``precheck``), never to accept a caller (the TokenReview decides that)."""
    return _jwt_part(token, 1) or {}


def precheck(token: str, namespace: str, audience: str, now: float) -> None:
    """Refuse, without a TokenReview, a token whose own claims already refuse it: not a JWT, not
    minted for ``audience``, expired, of another namespace than the URL's, or bound to no pod. The
    claims are unverified, so they can only ever refuse: a token that passes still needs the
    TokenReview (and a forger who writes the right claims gains only that review)."""
    if len(token) > MAX_TOKEN_CHARS or not _JWT.match(token) or _jwt_part(token, 0) is None:
        raise Rejected(401, "Unauthenticated", "the token is not a JWT (the pod's projected service-account token)")
    claims = _jwt_part(token, 1)
    if claims is None:
        raise Rejected(401, "Unauthenticated", "the token is not a JWT (the pod's projected service-account token)")
    if audience not in token_audiences(token):
        raise Rejected(403, "WrongAudience", f"the token's audience is not {audience}")
    exp = claims.get("exp")
    if not isinstance(exp, (int, float)) or isinstance(exp, bool) or exp + CLOCK_SKEW_SECONDS < now:
        raise Rejected(401, "Unauthenticated", "the token has expired (or carries no expiry)")
    bound = claims.get("kubernetes.io")
    bound = bound if isinstance(bound, dict) else {}
    if bound.get("namespace") != namespace:
        raise Rejected(403, "Forbidden", f"only service accounts of namespace {namespace} may report here")
    pod = bound.get("pod")
    if not isinstance(pod, dict) or not pod.get("name") or not pod.get("uid"):
        raise Rejected(403, "Forbidden", "the token is not bound to a pod")


def token_audiences(token: str) -> list[str]:
    aud = unverified_claims(token).get("aud")
    if isinstance(aud, str):
        return [aud]
    return [a for a in aud if isinstance(a, str)] if isinstance(aud, list) else []


# ---- per-source limit -------------------------------------------------------------------------


class SourceLimiter:
    """A token bucket per source address for the verifications that need a TokenReview: ``burst``
    at once, then ``per_second``. Remembers at most ``max_sources`` addresses (full buckets, which
    hold nothing worth remembering, are forgotten first)."""

    def __init__(self, per_second: float = SOURCE_REVIEWS_PER_SECOND, burst: int = SOURCE_REVIEW_BURST,
                 clock: Callable[[], float] = time.monotonic, max_sources: int = SOURCE_MAX_TRACKED) -> None:
        self.per_second, self.burst, self.clock, self.max_sources = per_second, burst, clock, max_sources
        self._buckets: dict[str, tuple[float, float]] = {}  # source -> (tokens, when counted); oldest first

    def __len__(self) -> int:
        return len(self._buckets)

    def _tokens(self, source: str, now: float) -> float:
        tokens, then = self._buckets.get(source, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - then) * self.per_second)

    def take(self, source: str) -> float:
        """0 when ``source`` may cause a TokenReview now (and it is counted); else the seconds until it may."""
        now = self.clock()
        tokens = self._tokens(source, now)
        self._buckets.pop(source, None)
        if len(self._buckets) >= self.max_sources:
            for full in [s for s in self._buckets if self._tokens(s, now) >= self.burst]:
                del self._buckets[full]
            while len(self._buckets) >= self.max_sources:
                del self._buckets[next(iter(self._buckets))]
        if tokens >= 1:
            self._buckets[source] = (tokens - 1, now)
            return 0.0
        self._buckets[source] = (tokens, now)
        return (1 - tokens) / self.per_second


# ---- verification cache -----------------------------------------------------------------------


class VerificationCache:
    """Token hash -> verified caller for a short TTL, so steady reporting costs no TokenReview per
    post; a refusal is remembered for ``failure_ttl``. Never past the token's expiry; bounded in
    size. Each source may start what ``limiter`` allows (429 beyond); at most ``concurrency``
    verifications run at once and ``queue`` wait (503 beyond)."""

    def __init__(
        self,
        ttl_seconds: float = CACHE_TTL_SECONDS,
        max_entries: int = CACHE_MAX_ENTRIES,
        clock: Callable[[], float] = time.time,
        failure_ttl_seconds: float = FAILURE_TTL_SECONDS,
        concurrency: int = VERIFY_CONCURRENCY,
        queue: int = VERIFY_QUEUE,
        limiter: SourceLimiter | None = None,
    ) -> None:
        self.limiter = limiter if limiter is not None else SourceLimiter()
        self.ttl = ttl_seconds
        self.failure_ttl = failure_ttl_seconds
        self.max_entries = max_entries
        self.clock = clock
        self.queue = queue
        self._entries: dict[str, tuple[Caller, float]] = {}
        self._refused: dict[tuple[str, str, str], tuple[Rejected, float]] = {}
        self._inflight: dict[tuple[str, str, str], asyncio.Future[Caller]] = {}
        self._slots = asyncio.Semaphore(concurrency)
        self._waiting = 0

    def get(self, key: str, namespace: str, name: str) -> Caller | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        caller, until = entry
        if self.clock() >= until:
            del self._entries[key]
            return None
        if (caller.namespace, caller.job) != (namespace, name):
            return None  # a verified token used for another job: verify (and reject) afresh
        return caller

    def _bounded(self, table: dict[Any, Any]) -> None:
        if len(table) >= self.max_entries:
            now = self.clock()
            for stale in [k for k, (_, t) in table.items() if t <= now]:
                del table[stale]
            while len(table) >= self.max_entries:
                del table[next(iter(table))]  # oldest first

    def put(self, key: str, caller: Caller) -> None:
        until = self.clock() + self.ttl
        if caller.expires_at is not None:
            until = min(until, caller.expires_at)
        self._bounded(self._entries)
        self._entries[key] = (caller, until)

    def forget(self, token: str) -> None:
        self._entries.pop(token_hash(token), None)

    async def verify(self, verifier: Verifier, token: str, namespace: str, name: str, source: str = "") -> Caller:
        key = token_hash(token)
        cached = self.get(key, namespace, name)
        if cached is not None:
            return cached
        flight_key = (key, namespace, name)
        refused = self._refused.get(flight_key)
        if refused is not None:
            if self.clock() < refused[1]:
                raise refused[0]
            del self._refused[flight_key]
        # Concurrent posts with one token share one TokenReview.
        pending = self._inflight.get(flight_key)
        if pending is not None:
            return await asyncio.shield(pending)
        wait = self.limiter.take(source)
        if wait > 0:
            raise Rejected(429, "TooManyRequests", "too many unverified tokens from this address; retry later",
                           retry_after=wait)
        if self._waiting >= self.queue:
            raise Rejected(503, "Busy", "too many progress reports are being verified; retry later", retry_after=1)
        future: asyncio.Future[Caller] = asyncio.get_running_loop().create_future()
        self._inflight[flight_key] = future
        self._waiting += 1
        try:
            async with self._slots:
                caller = await verifier(token, namespace, name)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            if isinstance(exc, Rejected) and exc.status in (401, 403, 404):
                self._bounded(self._refused)
                self._refused[flight_key] = (exc, self.clock() + self.failure_ttl)
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise
        finally:
            self._waiting -= 1
            self._inflight.pop(flight_key, None)
        future.set_result(caller)
        self.put(key, caller)
        return caller


# ---- the Kubernetes edge ----------------------------------------------------------------------


def _one(values: list[str] | None) -> str | None:
    return values[0] if values and len(values) == 1 and values[0] else None


class KubernetesVerifier:
    """TokenReview + ownership chain pod -> Job -> SFTJob. The objects come from the operator's
    cache when it has them (the watches are ours), otherwise from the API server."""

    def __init__(self, kube: KubeClient, audience: str, cache: Cache | None = None) -> None:
        self.kube = kube
        self.audience = audience
        self.cache = cache

    async def _get(self, kind: str, namespace: str, name: str, missing: Rejected) -> dict[str, Any]:
        try:
            return await self.kube.get(kind, namespace, name)
        except ApiError as exc:
            if exc.status == 404:
                raise missing from None
            log.error("progress verification: reading %s %s/%s failed: %s", kind, namespace, name, exc)
            raise Rejected(503, "Unavailable", "the operator cannot verify the request now") from None

    def _cached(self, kind: str, namespace: str, name: str, uid: str | None = None) -> dict[str, Any] | None:
        if self.cache is None:
            return None
        key = (namespace, name)
        if kind == "SFTJob":
            return self.cache.sftjobs.get(key)
        if kind == "Job":
            job = self.cache.child("Job", key)
            return job if job is not None and job["metadata"].get("uid") == uid else None
        for pods in self.cache.pods.values():
            pod = pods.get(uid or "")
            if pod is not None and pod["metadata"].get("namespace") == namespace:
                return pod
        return None

    async def __call__(self, token: str, namespace: str, name: str) -> Caller:
        try:
            status = await self.kube.token_review(token, [self.audience])
        except ApiError as exc:
            log.error("progress verification: TokenReview failed: %s", exc)
            raise Rejected(503, "Unavailable", "the operator cannot verify the request now") from None
        if not status.get("authenticated"):
            audiences = token_audiences(token)
            if audiences and self.audience not in audiences:  # a real token, minted for someone else
                raise Rejected(403, "WrongAudience", f"the token's audience is not {self.audience}")
            raise Rejected(401, "Unauthenticated", status.get("error") or "the token is not valid")
        if self.audience not in (status.get("audiences") or []):
            raise Rejected(403, "WrongAudience", f"the token's audience is not {self.audience}")
        user = status.get("user") or {}
        username = user.get("username") or ""
        sa_namespace, _, sa_name = username.removeprefix(SERVICE_ACCOUNT_PREFIX).partition(":")
        if not username.startswith(SERVICE_ACCOUNT_PREFIX) or sa_namespace != namespace or not sa_name:
            raise Rejected(403, "Forbidden", f"only service accounts of namespace {namespace} may report here")
        extra = user.get("extra") or {}
        pod_name, pod_uid = _one(extra.get(POD_NAME_EXTRA)), _one(extra.get(POD_UID_EXTRA))
        if not pod_name or not pod_uid:
            raise Rejected(403, "Forbidden", "the token is not bound to a pod")

        sftjob = self._cached("SFTJob", namespace, name) or await self._get(
            "SFTJob", namespace, name, Rejected(404, "NotFound", f"SFTJob {namespace}/{name} not found"))
        sftjob_uid = sftjob.get("metadata", {}).get("uid")
        wrong_job = Rejected(403, "Forbidden", f"the calling pod does not belong to SFTJob {namespace}/{name}")
        pod = self._cached("Pod", namespace, pod_name, pod_uid) or await self._get("Pod", namespace, pod_name, wrong_job)
        meta = pod.get("metadata") or {}
        if meta.get("uid") != pod_uid or meta.get("name") != pod_name or (meta.get("labels") or {}).get(LABEL_JOB) != name:
            raise wrong_job
        if ((pod.get("spec") or {}).get("serviceAccountName") or "default") != sa_name:
            raise wrong_job
        job_ref = controller_of(pod)
        if job_ref is None or job_ref.get("kind") != "Job" or job_ref.get("apiVersion") != "batch/v1":
            raise wrong_job
        job = self._cached("Job", namespace, job_ref.get("name", ""), job_ref.get("uid")) or await self._get(
            "Job", namespace, job_ref.get("name", ""), wrong_job)
        if (job.get("metadata") or {}).get("uid") != job_ref.get("uid"):
            raise wrong_job
        owner = controller_of(job)
        if (
            owner is None
            or owner.get("kind") != KIND
            or owner.get("apiVersion") != f"{GROUP}/{VERSION}"
            or owner.get("name") != name
            or not sftjob_uid
            or owner.get("uid") != sftjob_uid
        ):
            raise wrong_job
        exp = unverified_claims(token).get("exp")  # verified by the TokenReview above
        return Caller(namespace, name, pod_name, pod_uid, username,
                      float(exp) if isinstance(exp, (int, float)) else None, sftjob_uid)
