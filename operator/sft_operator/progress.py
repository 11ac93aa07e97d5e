"""The progress endpoint: trainer pods push progress, the operator writes `status` (KEP-2779).

Training code never gets write access to the API server. A trainer pod POSTs a
``ProgressReport`` with its projected service-account token (audience
``settings.token_audience``) to ``/v1/namespaces/{ns}/sftjobs/{name}/progress``; the operator

1. authenticates the token with a TokenReview bound to our audience,
2. checks that the caller is a pod of that very SFTJob: a service account of ``{ns}``, the
   pod named in the token (uid matching) carries ``sft.dev/job-name={name}`` and is owned by
   the Job that the SFTJob ``{ns}/{name}`` controls (uids checked along the chain),
3. validates the size-bounded payload,
4. coalesces reports per job and writes at most one status merge patch per
   ``progress_min_interval_seconds`` (a final report is written at once), and exports the
   per-job Prometheus gauges.

A rejected request never reaches the coalescer, so it never changes status.

``build_app(verifier, sink)`` is pure wiring, testable with fakes; ``start_progress_server``
binds it to the real API server.
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
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import ValidationError
from sft_trainer.config import ProgressReport

from . import GROUP, KIND, PLURAL, VERSION, metrics
from .render import LABEL_JOB

MAX_BODY_BYTES = 16 * 1024
CACHE_TTL_SECONDS = 60.0
CACHE_MAX_ENTRIES = 4096
WRITE_ATTEMPTS = 3
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
PROGRESS_PATH = "/v1/namespaces/{namespace}/sftjobs/{name}/progress"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_TERMINAL_PHASES = ("Succeeded", "Failed")

log = logging.getLogger(__name__)


class Rejected(Exception):
    """A request the endpoint refuses; `status` is the HTTP status, `reason` one CamelCase word."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Caller:
    """A verified trainer pod, allowed to report for `namespace/job`."""

    namespace: str
    job: str
    pod_name: str
    pod_uid: str
    username: str
    expires_at: float | None = None  # the token's `exp` (epoch seconds), when known


# (token, namespace, sftjob name) -> the verified caller, or raise Rejected.
Verifier = Callable[[str, str, str], Awaitable[Caller]]
# (namespace, sftjob name, report) -> None; writes status. Raising makes the coalescer retry.
Sink = Callable[[str, str, ProgressReport], Awaitable[None]]


# ---- pure parts -------------------------------------------------------------------------------


def is_final(report: ProgressReport) -> bool:
    """The last report of a run: written at once, not held back by the rate limit."""
    return report.output_model is not None or (report.total_steps > 0 and report.step >= report.total_steps)


def merge_reports(older: ProgressReport | None, newer: ProgressReport) -> ProgressReport:
    """Coalesce: the newer report wins field by field; fields it lacks keep the older value
    (an eval loss reported between two writes is not lost)."""
    if older is None:
        return newer
    data = older.model_dump(exclude_none=True)
    data.update(newer.model_dump(exclude_none=True))
    return ProgressReport.model_validate(data)


def status_patch(report: ProgressReport) -> dict[str, Any]:
    """The merge patch of `status` for one report. Absent optional values are left untouched,
    except the ETA, which is cleared rather than left stale (and 0 once the run is complete)."""
    eta = report.eta_seconds
    if eta is None and report.total_steps > 0 and report.step >= report.total_steps:
        eta = 0
    progress = {
        "percent": report.percent,
        "step": report.step,
        "totalSteps": report.total_steps,
        "epoch": report.epoch,
        "etaSeconds": eta,
    }
    metric_values = {
        "trainLoss": report.train_loss,
        "evalLoss": report.eval_loss,
        "bestEvalLoss": report.best_eval_loss,
        "learningRate": report.learning_rate,
        "tokensPerSecond": report.tokens_per_second,
        "generalLossBefore": report.general_loss_before,
        "generalLossAfter": report.general_loss_after,
    }
    status: dict[str, Any] = {"progress": progress}
    present = {k: v for k, v in metric_values.items() if v is not None}
    if present:
        status["metrics"] = present
    output = {k: v for k, v in {"model": report.output_model, "bestCheckpoint": report.best_checkpoint}.items() if v}
    if output:
        status["output"] = output
    if report.effective_batch_size is not None:
        status["effectiveBatchSize"] = report.effective_batch_size
    return {"status": status}


def validation_errors(exc: ValidationError) -> list[dict[str, str]]:
    """Field paths in the wire's camelCase, e.g. `trainLoss`, with pydantic's message."""
    return [
        {"field": ".".join(str(p) for p in err["loc"]) or "(body)", "message": err["msg"]}
        for err in exc.errors(include_url=False)
    ]


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def unverified_claims(token: str) -> dict[str, Any]:
    """The JWT payload without checking the signature: only for messages and cache expiry,
    never for a security decision (the TokenReview makes those)."""
    try:
        payload = token.split(".")[1]
        payload += "=" * (-len(payload) % 4)
        claims = json.loads(base64.urlsafe_b64decode(payload))
        return claims if isinstance(claims, dict) else {}
    except (IndexError, ValueError, UnicodeDecodeError):
        return {}


def token_audiences(token: str) -> list[str]:
    aud = unverified_claims(token).get("aud")
    if isinstance(aud, str):
        return [aud]
    return [a for a in aud if isinstance(a, str)] if isinstance(aud, list) else []


# ---- verification cache -----------------------------------------------------------------------


class VerificationCache:
    """Token hash -> verified caller for a short TTL, so steady reporting costs no TokenReview per
    post. Only successes are cached, never past the token's expiry; bounded in size."""

    def __init__(
        self,
        ttl_seconds: float = CACHE_TTL_SECONDS,
        max_entries: int = CACHE_MAX_ENTRIES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ttl = ttl_seconds
        self.max_entries = max_entries
        self.clock = clock
        self._entries: dict[str, tuple[Caller, float]] = {}
        self._inflight: dict[tuple[str, str, str], asyncio.Future[Caller]] = {}

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

    def put(self, key: str, caller: Caller) -> None:
        until = self.clock() + self.ttl
        if caller.expires_at is not None:
            until = min(until, caller.expires_at)
        if len(self._entries) >= self.max_entries:
            now = self.clock()
            for stale in [k for k, (_, t) in self._entries.items() if t <= now]:
                del self._entries[stale]
            while len(self._entries) >= self.max_entries:
                del self._entries[next(iter(self._entries))]  # oldest first
        self._entries[key] = (caller, until)

    async def verify(self, verifier: Verifier, token: str, namespace: str, name: str) -> Caller:
        key = token_hash(token)
        cached = self.get(key, namespace, name)
        if cached is not None:
            return cached
        # Concurrent posts with one token share one TokenReview.
        flight_key = (key, namespace, name)
        pending = self._inflight.get(flight_key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Caller] = asyncio.get_running_loop().create_future()
        self._inflight[flight_key] = future
        try:
            caller = await verifier(token, namespace, name)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise
        finally:
            self._inflight.pop(flight_key, None)
        future.set_result(caller)
        self.put(key, caller)
        return caller


# ---- per-job coalescing and rate limit ---------------------------------------------------------


@dataclass
class _JobState:
    pending: ProgressReport | None = None
    last_write: float = -math.inf
    failures: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class Coalescer:
    """Keeps the latest report per job and writes at most once per `min_interval` seconds.

    The first report of an idle job is written at once; reports arriving within the interval
    are merged and written when it has passed; a final report is written as soon as the write
    in flight (if any) is done. A job's state is dropped after an idle interval, so memory is
    bounded by the jobs reporting now.
    """

    def __init__(self, sink: Sink, min_interval: float, logger: logging.Logger | None = None) -> None:
        self.sink = sink
        self.min_interval = max(0.0, min_interval)
        self.log = logger or log
        self._jobs: dict[tuple[str, str], _JobState] = {}

    def submit(self, namespace: str, name: str, report: ProgressReport) -> None:
        key = (namespace, name)
        state = self._jobs.get(key)
        if state is None:
            state = self._jobs[key] = _JobState()
        state.pending = merge_reports(state.pending, report)
        state.wake.set()
        if state.task is None or state.task.done():
            state.task = asyncio.get_running_loop().create_task(self._run(key, state), name=f"progress {key}")

    @property
    def active_jobs(self) -> int:
        return len(self._jobs)

    async def _run(self, key: tuple[str, str], state: _JobState) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                while True:
                    remaining = state.last_write + self.min_interval - loop.time()
                    final = state.pending is not None and is_final(state.pending) and not state.failures
                    if remaining <= 0 or final:  # a retry always waits the interval
                        break
                    state.wake.clear()
                    try:
                        await asyncio.wait_for(state.wake.wait(), remaining)
                    except TimeoutError:
                        pass
                if state.pending is None:
                    return  # a whole interval without reports: forget the job
                report, state.pending = state.pending, None
                state.last_write = loop.time()
                await self._write(key, state, report)
        finally:
            if self._jobs.get(key) is state and state.pending is None:
                del self._jobs[key]

    async def _write(self, key: tuple[str, str], state: _JobState, report: ProgressReport) -> None:
        namespace, name = key
        try:
            await self.sink(namespace, name, report)
            state.failures = 0
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the API server is the sink: keep serving, retry a few times
            state.failures += 1
            permanent = getattr(exc, "status", None) in (400, 404, 422)
            if permanent or state.failures >= WRITE_ATTEMPTS:
                self.log.warning("progress of %s/%s dropped after %d failed writes: %s",
                                 namespace, name, state.failures, exc)
                state.failures = 0
            else:
                self.log.info("progress write for %s/%s failed (will retry): %s", namespace, name, exc)
                state.pending = merge_reports(report, state.pending) if state.pending else report

    async def close(self) -> None:
        tasks = [s.task for s in self._jobs.values() if s.task is not None and not s.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._jobs.clear()


# ---- HTTP -------------------------------------------------------------------------------------


def _error(status: int, reason: str, message: str, **extra: Any) -> web.Response:
    headers = {"WWW-Authenticate": 'Bearer realm="sft-progress"'} if status == 401 else None
    return web.json_response({"reason": reason, "message": message, **extra}, status=status, headers=headers)


def _bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > 16 * 1024:
        return None
    return token


APP_COALESCER = web.AppKey("coalescer", Coalescer)
APP_CACHE = web.AppKey("cache", VerificationCache)


def build_app(
    verifier: Verifier,
    sink: Sink,
    *,
    min_interval_seconds: float = 2.0,
    max_body_bytes: int = MAX_BODY_BYTES,
    cache: VerificationCache | None = None,
    logger: logging.Logger | None = None,
) -> web.Application:
    """The progress endpoint as an aiohttp app; `verifier` and `sink` are the I/O edges."""
    logger = logger or log
    coalescer = Coalescer(sink, min_interval_seconds, logger)
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
            caller = await cache.verify(verifier, token, namespace, name)
        except Rejected as exc:
            logger.info("progress for %s/%s rejected: %s %s", namespace, name, exc.status, exc.message)
            return _error(exc.status, exc.reason, exc.message)
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
        coalescer.submit(namespace, name, report)
        logger.debug("progress for %s/%s from pod %s: step %d", namespace, name, caller.pod_name, report.step)
        return web.json_response({"accepted": True}, status=202)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def close(app: web.Application) -> None:
        await coalescer.close()

    # Bodies are read only after authentication; aiohttp's own cap stops oversized chunked ones.
    app = web.Application(client_max_size=max_body_bytes)
    app[APP_COALESCER] = coalescer
    app[APP_CACHE] = cache
    app.router.add_post(PROGRESS_PATH, progress)
    app.router.add_get("/healthz", healthz)
    app.on_cleanup.append(close)
    return app


# ---- the Kubernetes edges ----------------------------------------------------------------------


def _one(values: list[str] | None) -> str | None:
    return values[0] if values and len(values) == 1 and values[0] else None


def _controller_ref(obj: Any) -> Any | None:
    for ref in obj.metadata.owner_references or []:
        if ref.controller:
            return ref
    return None


class KubernetesVerifier:
    """TokenReview + ownership chain pod -> Job -> SFTJob, against the real API server."""

    def __init__(self, api_client: Any, audience: str) -> None:
        from kubernetes import client

        self.audience = audience
        self._client = client
        self._auth = client.AuthenticationV1Api(api_client)
        self._core = client.CoreV1Api(api_client)
        self._batch = client.BatchV1Api(api_client)
        self._custom = client.CustomObjectsApi(api_client)

    async def __call__(self, token: str, namespace: str, name: str) -> Caller:
        return await asyncio.to_thread(self.verify, token, namespace, name)

    def _call(self, fn: Callable[..., Any], *args: Any, missing: Rejected | None = None) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return fn(*args)
        except ApiException as exc:
            if exc.status == 404 and missing is not None:
                raise missing from None
            log.error("progress verification: API call %s failed: %s %s", fn.__name__, exc.status, exc.reason)
            raise Rejected(503, "Unavailable", "the operator cannot verify the request now") from None
        except Exception as exc:  # connection errors: the caller may retry later
            log.error("progress verification: API call %s failed: %s", fn.__name__, exc)
            raise Rejected(503, "Unavailable", "the operator cannot verify the request now") from None

    def verify(self, token: str, namespace: str, name: str) -> Caller:
        c = self._client
        review = self._call(
            self._auth.create_token_review,
            c.V1TokenReview(spec=c.V1TokenReviewSpec(token=token, audiences=[self.audience])),
        )
        status = review.status
        if status is None or not status.authenticated:
            audiences = token_audiences(token)
            if audiences and self.audience not in audiences:  # a real token, minted for someone else
                raise Rejected(403, "WrongAudience", f"the token's audience is not {self.audience}")
            raise Rejected(401, "Unauthenticated", (status.error if status else None) or "the token is not valid")
        if self.audience not in (status.audiences or []):
            raise Rejected(403, "WrongAudience", f"the token's audience is not {self.audience}")
        user = status.user
        username = (user.username if user else None) or ""
        sa_namespace, _, sa_name = username.removeprefix(SERVICE_ACCOUNT_PREFIX).partition(":")
        if not username.startswith(SERVICE_ACCOUNT_PREFIX) or sa_namespace != namespace or not sa_name:
            raise Rejected(403, "Forbidden", f"only service accounts of namespace {namespace} may report here")
        extra = (user.extra if user else None) or {}
        pod_name, pod_uid = _one(extra.get(POD_NAME_EXTRA)), _one(extra.get(POD_UID_EXTRA))
        if not pod_name or not pod_uid:
            raise Rejected(403, "Forbidden", "the token is not bound to a pod")

        sftjob = self._call(
            self._custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name,
            missing=Rejected(404, "NotFound", f"SFTJob {namespace}/{name} not found"),
        )
        sftjob_uid = sftjob.get("metadata", {}).get("uid")
        wrong_job = Rejected(403, "Forbidden", f"the calling pod does not belong to SFTJob {namespace}/{name}")
        pod = self._call(self._core.read_namespaced_pod, pod_name, namespace, missing=wrong_job)
        if pod.metadata.uid != pod_uid or (pod.metadata.labels or {}).get(LABEL_JOB) != name:
            raise wrong_job
        if ((pod.spec.service_account_name if pod.spec else None) or "default") != sa_name:
            raise wrong_job
        job_ref = _controller_ref(pod)
        if job_ref is None or job_ref.kind != "Job" or job_ref.api_version != "batch/v1":
            raise wrong_job
        job = self._call(self._batch.read_namespaced_job, job_ref.name, namespace, missing=wrong_job)
        if job.metadata.uid != job_ref.uid:
            raise wrong_job
        owner = _controller_ref(job)
        if (
            owner is None
            or owner.kind != KIND
            or owner.api_version != f"{GROUP}/{VERSION}"
            or owner.name != name
            or not sftjob_uid
            or owner.uid != sftjob_uid
        ):
            raise wrong_job
        exp = unverified_claims(token).get("exp")  # verified by the TokenReview above
        return Caller(namespace, name, pod_name, pod_uid, username,
                      float(exp) if isinstance(exp, (int, float)) else None)


class KubernetesStatusSink:
    """Writes a report as a merge patch of the SFTJob's status subresource, then the gauges."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self._custom = client.CustomObjectsApi(api_client)

    async def __call__(self, namespace: str, name: str, report: ProgressReport) -> None:
        obj = await asyncio.to_thread(
            self._custom.patch_namespaced_custom_object_status,
            GROUP, VERSION, namespace, PLURAL, name, status_patch(report),
        )
        phase = ((obj or {}).get("status") or {}).get("phase")
        # A late report of a finished job must not resurrect series that remove_job dropped.
        if phase not in _TERMINAL_PHASES:
            metrics.set_job_metrics(namespace, name, report)


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


def _default_api_client() -> Any:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


_runners: list[web.AppRunner] = []
_background: list[asyncio.Task[None]] = []


async def start_progress_server(
    settings: Any,
    logger: logging.Logger | None = None,
    *,
    verifier: Verifier | None = None,
    sink: Sink | None = None,
    api_client: Any = None,
    host: str | None = None,
) -> None:
    """Serve the progress endpoint on `settings.progress_port` in the running loop.

    TLS with `progress_tls_cert`/`progress_tls_key`; without them it refuses to start unless
    `progress_allow_plaintext` (local development only). Returns once listening.
    """
    logger = logger or log
    context = None
    if settings.progress_tls_cert and settings.progress_tls_key:
        context = ssl_context(settings.progress_tls_cert, settings.progress_tls_key)
    elif not settings.progress_allow_plaintext:
        raise RuntimeError(
            "the progress endpoint needs --progress-tls-cert and --progress-tls-key "
            "(or --progress-allow-plaintext, for local development only)"
        )
    if verifier is None or sink is None:
        api_client = api_client or _default_api_client()
        verifier = verifier or KubernetesVerifier(api_client, settings.token_audience)
        sink = sink or KubernetesStatusSink(api_client)
    app = build_app(
        verifier,
        sink,
        min_interval_seconds=getattr(settings, "progress_min_interval_seconds", 2.0),
        logger=logger,
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host=host, port=settings.progress_port, ssl_context=context)
    await site.start()
    _runners.append(runner)
    if context is not None:
        _background.append(asyncio.get_running_loop().create_task(
            reload_certificates(context, settings.progress_tls_cert, settings.progress_tls_key, logger),
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
