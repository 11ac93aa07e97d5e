"""The progress endpoint: trainer pods push progress, the operator writes `status` (KEP-2779).

Training code never gets write access to the API server. A trainer pod POSTs a
``ProgressReport`` with its projected service-account token to
``/v1/namespaces/{ns}/sftjobs/{name}/progress``; the operator

1. authenticates the caller as a pod of that very SFTJob (``sft_operator.runtime.progress_auth``:
   the token's claims, a cached TokenReview, the pod -> Job -> SFTJob ownership chain, the
   per-source and concurrency limits),
2. validates the size-bounded payload (``MAX_BODY_BYTES``; the body is read only after
   authentication),
3. hands the report to the status writer (``sft_operator.runtime.writer``), which refuses it for a
   finished SFTJob or one re-created under the same name (uid), and writes at most one status
   update with progress per ``progress_min_interval_seconds`` per job, final reports included.

A rejected request never reaches the writer, so it never changes status.

``build_app(verifier, sink)`` is pure wiring, testable with fakes; ``start_progress_server``
binds it to the operator's client, cache and writer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydantic import ValidationError

from sft_contract.messages import PROGRESS_PATH, ProgressReport
from sft_operator.runtime.progress_auth import (
    Caller,
    KubernetesVerifier,
    Rejected,
    SourceLimiter,
    VerificationCache,
    Verifier,
    precheck,
)
from sft_operator.runtime.settings import DEFAULT_TOKEN_AUDIENCE
from sft_operator.runtime.writer import ProgressRefused

if TYPE_CHECKING:
    from sft_operator.runtime.context import Context

MAX_BODY_BYTES = 16 * 1024
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")

log = logging.getLogger(__name__)

# (caller, report) -> None: hands the report to the status writer, or raises Rejected.
Sink = Callable[[Caller, ProgressReport], None]


def validation_errors(exc: ValidationError) -> list[dict[str, str]]:
    """Field paths in the wire's camelCase, e.g. `trainLoss`, with pydantic's message."""
    return [
        {"field": ".".join(str(p) for p in err["loc"]) or "(body)", "message": err["msg"]}
        for err in exc.errors(include_url=False)
    ]


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
