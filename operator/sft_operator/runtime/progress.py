"""The progress endpoint: trainer pods push progress, the operator writes `status` (KEP-2779).

Training code never gets write access to the API server. A trainer pod POSTs a
``ProgressReport`` with its projected service-account token (audience
``settings.token_audience``) to ``/v1/namespaces/{ns}/sftjobs/{name}/progress``; the operator

1. authenticates the token with a TokenReview bound to our audience,
2. checks that the caller is a pod of that very SFTJob: a service account of ``{ns}``, the
   pod named in the token (uid matching) carries ``sft.dev/job-name={name}`` and is owned by
   the Job that the SFTJob ``{ns}/{name}`` controls (uids checked along the chain),
3. validates the size-bounded payload,
4. hands the report to the status writer (``sft_operator.runtime.writer``), which refuses it for a
   finished SFTJob or one re-created under the same name (uid), and writes at most one status
   update with progress per ``progress_min_interval_seconds`` per job, final reports included.

A rejected request never reaches the writer, so it never changes status. What the token's own
claims refuse costs no TokenReview (``precheck``: not a JWT, not our audience, expired, another
namespace, not bound to a pod); a forger gains nothing from them, as they only ever refuse.
Verifications are cached (successes for a minute, refusals for ``FAILURE_TTL_SECONDS``); each
source address may cause ``SourceLimiter``'s burst of TokenReviews, then one per second (429 with
Retry-After beyond); at most ``VERIFY_CONCURRENCY`` run at once and at most ``VERIFY_QUEUE`` wait,
beyond that the endpoint answers 503 at once. Junk traffic therefore cannot fill the
verification slots that real trainers need.

``build_app(verifier, sink)`` is pure wiring, testable with fakes; ``start_progress_server``
binds it to the operator's client, cache and writer.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import os
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydantic import ValidationError

from sft_contract.messages import PROGRESS_PATH, ProgressReport
from sft_operator.api import GROUP, KIND, VERSION
from sft_operator.core.decisions import controller_of
from sft_operator.core.render import LABEL_JOB
from sft_operator.runtime.client import ApiError, KubeClient
from sft_operator.runtime.settings import DEFAULT_TOKEN_AUDIENCE
from sft_operator.runtime.writer import ProgressRefused

if TYPE_CHECKING:
    from sft_operator.runtime.cache import Cache
    from sft_operator.runtime.context import Context

MAX_BODY_BYTES = 16 * 1024
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
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")

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
# (caller, report) -> None: hands the report to the status writer, or raises Rejected.
Sink = Callable[[Caller, ProgressReport], None]


# ---- pure parts -------------------------------------------------------------------------------


def validation_errors(exc: ValidationError) -> list[dict[str, str]]:
    """Field paths in the wire's camelCase, e.g. `trainLoss`, with pydantic's message."""
    return [
        {"field": ".".join(str(p) for p in err["loc"]) or "(body)", "message": err["msg"]}
        for err in exc.errors(include_url=False)
    ]


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


# ---- HTTP -------------------------------------------------------------------------------------


def _error(status: int, reason: str, message: str, retry_after: float | None = None, **extra: Any) -> web.Response:
    headers = {"WWW-Authenticate": 'Bearer realm="sft-progress"'} if status == 401 else {}
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return web.json_response({"reason": reason, "message": message, **extra}, status=status, headers=headers)


def _bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def build_app(
    verifier: Verifier,
    sink: Sink,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    cache: VerificationCache | None = None,
    logger: logging.Logger | None = None,
    audience: str = DEFAULT_TOKEN_AUDIENCE,
    clock: Callable[[], float] = time.time,
) -> web.Application:
    """The progress endpoint as an aiohttp app; `verifier` and `sink` are the I/O edges, `audience`
    the one trainer tokens must be minted for."""
    logger = logger or log
    cache = cache or VerificationCache()

    async def progress(request: web.Request) -> web.Response:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        if not (_DNS_LABEL.match(namespace) and _DNS_LABEL.match(name)):
            return _error(404, "NotFound", "no such SFTJob")
        if request.content_length is not None and request.content_length > max_body_bytes:
            return _error(413, "PayloadTooLarge", f"the body may be at most {max_body_bytes} bytes")
        token = _bearer_token(request)
        if token is None:
            return _error(401, "Unauthenticated", "a Bearer token (the pod's projected service-account token) is required")
        try:
            precheck(token, namespace, audience, clock())
        except Rejected as exc:  # debug only: a flood of junk would flood the log too
            logger.debug("progress for %s/%s from %s refused by its token's claims: %s %s", namespace, name,
                         request.remote, exc.status, exc.message)
            return _error(exc.status, exc.reason, exc.message)
        try:
            caller = await cache.verify(verifier, token, namespace, name, request.remote or "")
        except Rejected as exc:
            (logger.debug if exc.status == 429 else logger.info)(
                "progress for %s/%s from %s rejected: %s %s", namespace, name, request.remote, exc.status, exc.message)
            return _error(exc.status, exc.reason, exc.message, exc.retry_after)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _error(413, "PayloadTooLarge", f"the body may be at most {max_body_bytes} bytes")
        if len(body) > max_body_bytes:
            return _error(413, "PayloadTooLarge", f"the body may be at most {max_body_bytes} bytes")
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            return _error(400, "MalformedJSON", f"the body is not JSON: {exc}")
        try:
            report = ProgressReport.model_validate(data)
        except ValidationError as exc:
            return _error(422, "Invalid", "the progress report is invalid", errors=validation_errors(exc))
        try:
            sink(caller, report)
        except Rejected as exc:
            if exc.reason == "Recreated":  # the cached verification speaks for a deleted SFTJob
                cache.forget(token)
            logger.info("progress for %s/%s refused: %s %s", namespace, name, exc.status, exc.message)
            return _error(exc.status, exc.reason, exc.message)
        logger.debug("progress for %s/%s from pod %s: step %d", namespace, name, caller.pod_name, report.step)
        return web.json_response({"accepted": True}, status=202)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    # Bodies are read only after authentication; aiohttp's own cap stops oversized chunked ones.
    app = web.Application(client_max_size=max_body_bytes)
    app.router.add_post(PROGRESS_PATH, progress)
    app.router.add_get("/healthz", healthz)
    return app


# ---- the Kubernetes edges ----------------------------------------------------------------------


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


def writer_sink(ctx: Context) -> Sink:
    """Reports go to the status writer, for the SFTJob (by uid) the caller was verified for."""

    def sink(caller: Caller, report: ProgressReport) -> None:
        try:
            ctx.writer.offer(caller.namespace, caller.job, caller.sftjob_uid, report)
        except ProgressRefused as exc:
            raise Rejected(exc.status, exc.reason, exc.message) from None

    return sink


def ssl_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


CERT_RELOAD_SECONDS = 60.0


def _mtimes(*paths: str) -> tuple[float, ...]:
    return tuple(os.stat(p).st_mtime for p in paths)


async def reload_certificates(
    context: ssl.SSLContext, cert_file: str, key_file: str, logger: logging.Logger, interval: float = CERT_RELOAD_SECONDS
) -> None:
    """Pick up a renewed cert/key (cert-manager rotates the mounted Secret) without a restart:
    new handshakes use the new chain, open connections keep theirs."""
    seen = _mtimes(cert_file, key_file)
    while True:
        await asyncio.sleep(interval)
        try:
            current = _mtimes(cert_file, key_file)
            if current != seen:
                context.load_cert_chain(cert_file, key_file)
                seen = current
                logger.info("progress endpoint: reloaded TLS certificate %s", cert_file)
        except (OSError, ssl.SSLError) as exc:  # mid-rotation (cert and key not yet both new): next time
            logger.warning("progress endpoint: TLS certificate not reloaded yet: %s", exc)


_runners: list[web.AppRunner] = []
_background: list[asyncio.Task[None]] = []


async def start_progress_server(
    ctx: Context,
    logger: logging.Logger | None = None,
    *,
    verifier: Verifier | None = None,
    sink: Sink | None = None,
    host: str | None = None,
) -> None:
    """Serve the progress endpoint on `settings.progress_port` in the running loop: TLS with
    `progress_tls_cert`/`progress_tls_key`, plaintext only with `progress_allow_plaintext`
    (checked before start-up, ``OperatorSettings.problems``). Returns once listening."""
    logger = logger or log
    settings = ctx.settings
    context = None
    if settings.progress_tls_cert and settings.progress_tls_key:
        context = ssl_context(settings.progress_tls_cert, settings.progress_tls_key)
    elif not settings.progress_allow_plaintext:
        raise RuntimeError("the progress endpoint needs --progress-tls-cert and --progress-tls-key "
                           "(or --progress-allow-plaintext, for local development only)")
    verifier = verifier or KubernetesVerifier(ctx.kube, settings.token_audience, ctx.cache)
    limiter = SourceLimiter(settings.progress_source_reviews_per_second, settings.progress_source_review_burst)
    app = build_app(verifier, sink or writer_sink(ctx), logger=logger, audience=settings.token_audience,
                    cache=VerificationCache(limiter=limiter))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host=host, port=settings.progress_port, ssl_context=context)
    await site.start()
    _runners.append(runner)
    if context is not None:
        _background.append(asyncio.get_running_loop().create_task(
            reload_certificates(context, settings.progress_tls_cert, settings.progress_tls_key, logger,
                                settings.reload_seconds),
            name="progress TLS reload",
        ))
    logger.info("progress endpoint listening on port %d (%s)", settings.progress_port,
                "TLS" if context else "plaintext, development only")


async def stop_progress_server() -> None:
    """Stop every server `start_progress_server` started in this process (operator cleanup)."""
    while _background:
        task = _background.pop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    while _runners:
        await _runners.pop().cleanup()
