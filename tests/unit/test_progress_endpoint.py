"""The progress endpoint with fake verifier and sink: auth, payload limits, coalescing, rate limit."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from collections.abc import Awaitable, Callable
from types import SimpleNamespace

import aiohttp
import aiohttp.web
import pytest
from aiohttp.test_utils import TestClient, TestServer
from sft_operator.runtime import progress_auth, progress_server
from sft_operator.runtime.progress_auth import Caller, Rejected
from sft_operator.runtime.progress_server import build_app
from sft_operator.runtime.settings import OperatorSettings
from sft_contract.messages import ProgressReport
from support import free_port
from tls_certs import self_signed

NS, JOB = "team-a", "llama"
URL = f"/v1/namespaces/{NS}/sftjobs/{JOB}/progress"
AUDIENCE = "sft.dev/progress"
FAR = 4102444800  # 2100-01-01: a token that has not expired


def jwt(pod: str | None = "llama-0-abcde", namespace: str = NS, aud=(AUDIENCE,), exp: float | None = FAR,
        signature: str = "c2lnbmF0dXJl", **claims) -> str:
    """A projected service-account token as the kubelet mounts it (only the signature is fake)."""
    def part(value: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    kubernetes = {"namespace": namespace, "serviceaccount": {"name": "default", "uid": "sa-uid"}}
    if pod is not None:
        kubernetes["pod"] = {"name": pod, "uid": f"uid-{pod}"}
    payload = {"aud": list(aud), "iss": "https://kubernetes.default.svc", "sub": f"system:serviceaccount:{namespace}:default",
               "kubernetes.io": kubernetes, **claims}
    if exp is not None:
        payload["exp"] = exp
    return f"{part({'alg': 'RS256', 'kid': 'k1'})}.{part(payload)}.{signature}"


GOOD = jwt()
OTHER_JOB = jwt(pod="other-0-abcde")
WRONG_AUDIENCE = jwt(aud=["https://kubernetes.default.svc"])
FORGED = jwt(signature="Zm9yZ2Vk")  # well-formed, our audience and namespace: only a TokenReview can refuse it


class FakeVerifier:
    """Stands in for TokenReview + ownership checks; counts calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    async def __call__(self, token: str, namespace: str, name: str) -> Caller:
        self.calls.append((token, namespace, name))
        await asyncio.sleep(0)
        if token == WRONG_AUDIENCE:  # (refused before any verification since the endpoint reads the claims)
            raise Rejected(403, "WrongAudience", "the token's audience is not sft.dev/progress")
        if token == OTHER_JOB:
            raise Rejected(403, "Forbidden", "the calling pod does not belong to this SFTJob")
        if token != GOOD:
            raise Rejected(401, "Unauthenticated", "the token is not valid")
        if name == "missing":
            raise Rejected(404, "NotFound", "SFTJob not found")
        if (namespace, name) != (NS, JOB):
            raise Rejected(403, "Forbidden", "the calling pod does not belong to this SFTJob")
        return Caller(NS, JOB, "llama-0-abcde", "uid-1", f"system:serviceaccount:{NS}:default", sftjob_uid="sftjob-uid")


class FakeSink:
    """Stands in for the status writer: takes reports, or refuses them like a finished job's."""

    def __init__(self, refuse: Rejected | None = None) -> None:
        self.writes: list[tuple[str, str, ProgressReport]] = []
        self.refuse = refuse

    def __call__(self, caller: Caller, report: ProgressReport) -> None:
        if self.refuse is not None:
            raise self.refuse
        self.writes.append((caller.namespace, caller.job, report))

    @property
    def steps(self) -> list[int]:
        return [w[2].step for w in self.writes]


def report(step: int, total: int = 100, **extra) -> dict:
    return {"step": step, "totalSteps": total, "epoch": step / 50, "trainLoss": 2.0 - step / 100, **extra}


def auth(token: str = GOOD) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def scenario(test: Callable[[TestClient, FakeVerifier, FakeSink], Awaitable[None]], *,
             sink: FakeSink | None = None, max_body: int = progress_server.MAX_BODY_BYTES, verifier=None,
             cache: Callable[[], progress_auth.VerificationCache] | None = None) -> None:
    async def main() -> None:
        fake_verifier, fake_sink = verifier or FakeVerifier(), sink or FakeSink()
        app = build_app(fake_verifier, fake_sink, max_body_bytes=max_body, cache=cache() if cache else None)
        async with TestClient(TestServer(app)) as client:
            await test(client, fake_verifier, fake_sink)

    asyncio.run(main())


async def settle(seconds: float = 0.05) -> None:
    await asyncio.sleep(seconds)


# ---- happy path -------------------------------------------------------------------------------


def test_valid_report_is_accepted_quickly_and_written():
    async def test(client, verifier, sink):
        response = await client.post(URL, json=report(10, evalLoss=1.7), headers=auth())
        assert response.status == 202
        await settle()
        assert len(sink.writes) == 1
        ns, name, written = sink.writes[0]
        assert (ns, name) == (NS, JOB)
        assert written.step == 10 and written.eval_loss == 1.7

    scenario(test)


def test_healthz_answers():
    async def test(client, verifier, sink):
        response = await client.get("/healthz")
        assert response.status == 200
        assert await response.text() == "ok"

    scenario(test)


# ---- rejections never reach the sink ---------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "status", "reason"),
    [
        ({}, 401, "Unauthenticated"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, 401, "Unauthenticated"),
        ({"Authorization": "Bearer "}, 401, "Unauthenticated"),
        (auth("forged"), 401, "Unauthenticated"),
        (auth(FORGED), 401, "Unauthenticated"),
        (auth(WRONG_AUDIENCE), 403, "WrongAudience"),
        (auth(OTHER_JOB), 403, "Forbidden"),
    ],
    ids=["no-token", "basic-auth", "empty-bearer", "invalid-token", "forged-signature", "wrong-audience",
         "other-jobs-pod"],
)
def test_unauthenticated_or_foreign_callers_are_rejected(headers, status, reason):
    async def test(client, verifier, sink):
        response = await client.post(URL, json=report(5), headers=headers)
        assert response.status == status
        body = await response.json()
        assert body["reason"] == reason
        if status == 401:
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
        await settle()
        assert sink.writes == []

    scenario(test)


# ---- junk is refused before any TokenReview; a source that floods is limited -------------------


@pytest.mark.parametrize(
    ("token", "status", "message"),
    [
        ("not-a-jwt", 401, "not a JWT"),
        ("a.b", 401, "not a JWT"),
        ("aa.bb.cc", 401, "not a JWT"),  # three parts, but not JSON
        ("e30.e30.c2ln" + "A" * 9000, 401, "not a JWT"),  # larger than any projected token
        (jwt(aud=["https://kubernetes.default.svc"]), 403, "audience is not sft.dev/progress"),
        (jwt(aud=[]), 403, "audience is not sft.dev/progress"),
        (jwt(exp=1_600_000_000), 401, "expired"),
        (jwt(exp=None), 401, "expired"),
        (jwt(namespace="team-b"), 403, "namespace team-a"),
        (jwt(pod=None), 403, "not bound to a pod"),
    ],
    ids=["no-dots", "two-parts", "not-json", "oversized", "other-audience", "no-audience", "expired", "no-expiry",
         "other-namespace", "not-pod-bound"],
)
def test_a_token_its_own_claims_refuse_is_refused_without_a_token_review(token, status, message):
    with pytest.raises(Rejected) as exc:
        progress_auth.precheck(token, NS, AUDIENCE, now=1_700_000_000)
    assert exc.value.status == status and message in exc.value.message
    progress_auth.precheck(GOOD, NS, AUDIENCE, now=1_700_000_000)  # a real token passes on to the TokenReview


def junk(i: int) -> dict[str, str]:
    """A thousand ways to knock: each request different, so no cache can help."""
    kinds = [
        {},
        {"Authorization": f"Basic dXNlcjp{i}"},
        auth(f"garbage-{i}"),
        auth(f"{i}.{i}.{i}x"),
        auth(jwt(aud=[f"https://kubernetes.default.svc/{i}"])),
        auth(jwt(exp=1_600_000_000 + i)),
        auth(jwt(namespace=f"team-{i}")),
        auth(jwt(pod=None, jti=str(i))),
    ]
    return kinds[i % len(kinds)]


def test_a_thousand_junk_requests_cost_no_token_review_and_a_real_trainer_still_gets_through():
    async def test(client, verifier, sink):
        statuses = []
        for start in range(0, 1000, 50):
            responses = await asyncio.gather(*(client.post(URL, json=report(1), headers=junk(i))
                                               for i in range(start, start + 50)))
            statuses += [r.status for r in responses]
        assert set(statuses) == {401, 403} and len(statuses) == 1000
        assert verifier.calls == []  # not one TokenReview, so no verification slot was taken
        response = await client.post(URL, json=report(7), headers=auth())
        assert response.status == 202 and sink.steps == [7]
        assert len(verifier.calls) == 1

    scenario(test)


def test_a_source_flooding_well_formed_forgeries_gets_429_and_other_sources_get_through():
    now = [1000.0]
    limiter = progress_auth.SourceLimiter(per_second=1.0, burst=5, clock=lambda: now[0])

    async def test(client, verifier, sink):
        forgeries = [jwt(signature=f"Zm9yZ2Vk{i}") for i in range(100)]
        responses = await asyncio.gather(*(client.post(URL, json=report(1), headers=auth(t)) for t in forgeries))
        statuses = [r.status for r in responses]
        assert statuses.count(401) == 5 and statuses.count(429) == 95
        assert len(verifier.calls) == 5  # the source's burst, then no more TokenReviews
        limited = next(r for r in responses if r.status == 429)
        assert limited.headers["Retry-After"] == "1" and (await limited.json())["reason"] == "TooManyRequests"
        # A trainer pod has its own address: the flood next door does not hold it up.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as other:
            async with other.post(client.make_url(URL), json=report(9), headers=auth()) as response:
                assert response.status == 202
        assert sink.steps == [9]
        now[0] += 2  # the flooding address recovers as its bucket refills
        assert (await client.post(URL, json=report(1), headers=auth(jwt(signature="bmV3")))).status == 401

    scenario(test, cache=lambda: progress_auth.VerificationCache(limiter=limiter))


def test_the_source_limiter_refills_answers_the_wait_and_stays_bounded():
    now = [0.0]
    limiter = progress_auth.SourceLimiter(per_second=0.5, burst=2, clock=lambda: now[0], max_sources=3)
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 2.0]
    now[0] += 1
    assert limiter.take("a") == 1.0
    now[0] += 1
    assert limiter.take("a") == 0.0
    for source in "bcdefg":
        limiter.take(source)
    assert len(limiter) <= 3


def test_unknown_sftjob_is_404_and_bad_names_never_reach_the_verifier():
    async def test(client, verifier, sink):
        response = await client.post(f"/v1/namespaces/{NS}/sftjobs/missing/progress", json=report(1), headers=auth())
        assert response.status == 404
        calls = len(verifier.calls)
        response = await client.post("/v1/namespaces/Team_A/sftjobs/x/progress", json=report(1), headers=auth())
        assert response.status == 404
        assert len(verifier.calls) == calls
        await settle()
        assert sink.writes == []

    scenario(test)


def test_a_token_verified_for_one_job_is_not_accepted_for_another():
    async def test(client, verifier, sink):
        assert (await client.post(URL, json=report(1), headers=auth())).status == 202
        other = f"/v1/namespaces/{NS}/sftjobs/someone-else/progress"
        response = await client.post(other, json=report(1), headers=auth())
        assert response.status == 403  # not served from the cache: verified afresh and refused
        assert verifier.calls[-1] == (GOOD, NS, "someone-else")
        await settle()
        assert [(w[0], w[1]) for w in sink.writes] == [(NS, JOB)]

    scenario(test)


def test_oversized_payload_is_413():
    async def test(client, verifier, sink):
        big = report(1, message="x" * 1000)
        body = json.dumps(big).encode()
        response = await client.post(URL, data=body, headers={**auth(), "Content-Type": "application/json"})
        assert response.status == 413
        assert verifier.calls == []  # refused on Content-Length before any TokenReview

        async def chunks():  # no Content-Length: the cap applies while reading
            for i in range(0, len(body), 100):
                yield body[i : i + 100]

        response = await client.post(URL, data=chunks(), headers={**auth(), "Content-Type": "application/json"})
        assert response.status == 413
        await settle()
        assert sink.writes == []

    scenario(test, max_body=512)


def test_default_body_cap_is_16_kib():
    async def test(client, verifier, sink):
        response = await client.post(URL, data=b" " * (16 * 1024 + 1), headers=auth())
        assert response.status == 413

    scenario(test)


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b"{not json", 400, None),
        (b"[" * 5000 + b"]" * 5000, 400, None),  # nesting bomb
        (json.dumps({"totalSteps": 10, "epoch": 0}).encode(), 422, "step"),
        (json.dumps(report(1, trainLoss="low")).encode(), 422, "trainLoss"),
        (json.dumps(report(1, trainLoss=-1)).encode(), 422, "trainLoss"),
        (b'{"step": 1, "totalSteps": 2, "epoch": 0, "trainLoss": NaN}', 422, "trainLoss"),
        (json.dumps(report(1, learningRate=1e9)).encode(), 422, "learningRate"),
        (json.dumps(report(1, podName="evil")).encode(), 422, "podName"),
        (json.dumps(report(1, outputModel="m" * 2000)).encode(), 422, "outputModel"),
        (b'"just a string"', 422, "(body)"),
    ],
    ids=["malformed", "deeply-nested", "missing-step", "wrong-type", "negative-loss", "nan-loss",
         "lr-out-of-range", "unknown-field", "long-string", "not-an-object"],
)
def test_invalid_payloads_are_rejected_with_field_paths(body, status, field):
    async def test(client, verifier, sink):
        response = await client.post(URL, data=body, headers={**auth(), "Content-Type": "application/json"})
        assert response.status == status
        payload = await response.json()
        if field:
            assert field in [e["field"] for e in payload["errors"]], payload
        await settle()
        assert sink.writes == []

    scenario(test)


# ---- caching -----------------------------------------------------------------------------------


def test_successful_verification_is_cached():
    async def test(client, verifier, sink):
        for step in range(5):
            assert (await client.post(URL, json=report(step), headers=auth())).status == 202
        assert len(verifier.calls) == 1
        for _ in range(3):  # a refusal is remembered too: one TokenReview, not three
            assert (await client.post(URL, json=report(1), headers=auth(FORGED))).status == 401
        assert len(verifier.calls) == 2

    scenario(test)


def test_a_refusal_is_remembered_briefly_then_verified_again():
    now = [1000.0]

    async def main():
        verifier = FakeVerifier()
        cache = progress_auth.VerificationCache(clock=lambda: now[0], failure_ttl_seconds=10)
        for _ in range(5):
            with pytest.raises(Rejected):
                await cache.verify(verifier, "forged", NS, JOB)
        assert len(verifier.calls) == 1
        now[0] += 11
        with pytest.raises(Rejected):
            await cache.verify(verifier, "forged", NS, JOB)
        assert len(verifier.calls) == 2

    asyncio.run(main())


def test_verification_is_capped_and_excess_callers_get_503_at_once():
    release = asyncio.Event

    class SlowVerifier(FakeVerifier):
        def __init__(self) -> None:
            super().__init__()
            self.running = self.peak = 0
            self.gate = release()

        async def __call__(self, token, namespace, name):
            self.running += 1
            self.peak = max(self.peak, self.running)
            await self.gate.wait()
            self.running -= 1
            return await super().__call__(GOOD, namespace, name)

    async def main():
        verifier = SlowVerifier()
        cache = progress_auth.VerificationCache(concurrency=2, queue=5)
        tasks = [asyncio.ensure_future(cache.verify(verifier, f"token-{i}", NS, JOB)) for i in range(8)]
        await asyncio.sleep(0.05)
        busy = [t for t in tasks if t.done()]
        assert len(busy) == 3 and all(isinstance(t.exception(), Rejected) and t.exception().status == 503 for t in busy)
        assert verifier.peak == 2  # at most two TokenReviews in flight
        verifier.gate.set()
        done = await asyncio.gather(*[t for t in tasks if t not in busy])
        assert len(done) == 5 and verifier.peak == 2

    asyncio.run(main())


def test_concurrent_posts_share_one_verification():
    async def test(client, verifier, sink):
        responses = await asyncio.gather(*(client.post(URL, json=report(i), headers=auth()) for i in range(8)))
        assert [r.status for r in responses] == [202] * 8
        assert len(verifier.calls) == 1

    scenario(test)


def test_cache_expires_and_never_outlives_the_token():
    now = [1000.0]
    cache = progress_auth.VerificationCache(ttl_seconds=60, clock=lambda: now[0])
    caller = Caller(NS, JOB, "p", "u", "system:serviceaccount:team-a:default")
    cache.put("k", caller)
    assert cache.get("k", NS, JOB) == caller
    assert cache.get("k", NS, "other") is None
    now[0] += 61
    assert cache.get("k", NS, JOB) is None
    short = Caller(NS, JOB, "p", "u", "sa", expires_at=now[0] + 5)
    cache.put("k2", short)
    now[0] += 6
    assert cache.get("k2", NS, JOB) is None


def test_cache_is_bounded():
    cache = progress_auth.VerificationCache(max_entries=10)
    for i in range(100):
        cache.put(f"k{i}", Caller(NS, JOB, "p", "u", "sa"))
    assert len(cache._entries) <= 10
    assert cache.get("k99", NS, JOB) is not None


# ---- what the writer refuses reaches the trainer ----------------------------------------------


@pytest.mark.parametrize(("status", "reason"), [(409, "Finished"), (409, "Recreated"), (404, "NotFound")])
def test_a_report_the_writer_refuses_is_answered_with_its_reason(status, reason):
    async def test(client, verifier, sink):
        response = await client.post(URL, json=report(3), headers=auth())
        assert response.status == status
        assert (await response.json())["reason"] == reason
        assert sink.writes == []

    scenario(test, sink=FakeSink(refuse=Rejected(status, reason, "refused")))


def test_a_recreated_sftjob_drops_the_cached_verification():
    async def test(client, verifier, sink):
        assert (await client.post(URL, json=report(1), headers=auth())).status == 202
        sink.refuse = Rejected(409, "Recreated", "SFTJob team-a/llama was deleted and created again")
        assert (await client.post(URL, json=report(2), headers=auth())).status == 409
        sink.refuse = None
        assert (await client.post(URL, json=report(3), headers=auth())).status == 202
        assert len(verifier.calls) == 2  # verified afresh against the new SFTJob

    scenario(test)


# ---- TLS and startup ----------------------------------------------------------------------------


def _ctx(settings: OperatorSettings) -> SimpleNamespace:
    """What start_progress_server reads from the operator's context."""
    return SimpleNamespace(settings=settings, kube=None, cache=None, writer=None)


def test_refuses_plaintext_unless_allowed():
    settings = OperatorSettings(progress_port=free_port())
    with pytest.raises(RuntimeError, match="progress-tls-cert"):
        asyncio.run(progress_server.start_progress_server(_ctx(settings), verifier=FakeVerifier(), sink=FakeSink()))


def test_serves_tls_with_the_configured_cert(tmp_path):
    cert, key = self_signed(tmp_path)
    port = free_port()
    settings = OperatorSettings(progress_port=port, progress_tls_cert=str(cert), progress_tls_key=str(key))
    sink = FakeSink()

    async def main():
        await progress_server.start_progress_server(_ctx(settings), verifier=FakeVerifier(), sink=sink, host="127.0.0.1")
        try:
            context = ssl.create_default_context(cafile=str(cert))
            async with aiohttp.ClientSession() as session:
                url = f"https://127.0.0.1:{port}{URL}"
                async with session.post(url, json=report(3), headers=auth(), ssl=context) as response:
                    assert response.status == 202
                with pytest.raises(aiohttp.ClientError):  # plain HTTP is not served
                    async with session.post(f"http://127.0.0.1:{port}{URL}", json=report(3), headers=auth()) as r:
                        assert r.status >= 400
                        raise aiohttp.ClientError("rejected")
            assert sink.steps == [3]
        finally:
            await progress_server.stop_progress_server()

    asyncio.run(main())


def test_a_renewed_certificate_is_served_without_a_restart(tmp_path):
    import os
    import shutil

    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    cert, key = self_signed(first)
    new_cert, new_key = self_signed(second)
    port = free_port()

    # As the operator starts it: --reload-seconds (60 by default, what the chart's values.yaml promises).
    settings = OperatorSettings(progress_port=port, progress_tls_cert=str(cert), progress_tls_key=str(key),
                                reload_seconds=0.05)

    async def main():
        await progress_server.start_progress_server(_ctx(settings), verifier=FakeVerifier(), sink=FakeSink(), host="127.0.0.1")
        try:
            served = await asyncio.to_thread(ssl.get_server_certificate, ("127.0.0.1", port))
            assert served.strip() == cert.read_text().strip()
            shutil.copy(new_cert, cert)
            shutil.copy(new_key, key)
            later = os.stat(cert).st_mtime + 5
            os.utime(cert, (later, later))
            os.utime(key, (later, later))
            await asyncio.sleep(0.3)
            served = await asyncio.to_thread(ssl.get_server_certificate, ("127.0.0.1", port))
            assert served.strip() == new_cert.read_text().strip()
        finally:
            await progress_server.stop_progress_server()

    asyncio.run(main())


def test_plaintext_when_explicitly_allowed():
    port = free_port()
    settings = OperatorSettings(progress_port=port, progress_allow_plaintext=True)

    async def main():
        await progress_server.start_progress_server(_ctx(settings), verifier=FakeVerifier(), sink=FakeSink(), host="127.0.0.1")
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                    assert response.status == 200
        finally:
            await progress_server.stop_progress_server()

    asyncio.run(main())


def test_unverified_audience_peek_handles_garbage():
    def jwt(claims: dict) -> str:
        enc = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        return f"e30.{enc}.sig"

    assert progress_auth.token_audiences(jwt({"aud": ["sft.dev/progress", "x"]})) == ["sft.dev/progress", "x"]
    assert progress_auth.token_audiences(jwt({"aud": "api"})) == ["api"]
    assert progress_auth.token_audiences("not-a-jwt") == []
    assert progress_auth.token_audiences("a.!!!.c") == []


# ---- the Kubernetes verifier's decision logic, with fake API objects ---------------------------


class _FakeKube:
    """Just enough of KubeClient for KubernetesVerifier: a TokenReview and reads, as the API server answers."""

    def __init__(self) -> None:
        self.review_status = {
            "authenticated": True,
            "audiences": ["sft.dev/progress"],
            "user": {"username": f"system:serviceaccount:{NS}:default",
                     "extra": {progress_auth.POD_NAME_EXTRA: ["llama-0-abcde"], progress_auth.POD_UID_EXTRA: ["pod-uid"]}},
        }
        self.objects = {
            ("SFTJob", JOB): {"metadata": {"name": JOB, "uid": "sftjob-uid"}},
            ("Pod", "llama-0-abcde"): {
                "metadata": {"name": "llama-0-abcde", "namespace": NS, "uid": "pod-uid", "labels": {"sft.dev/job-name": JOB},
                             "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": JOB, "uid": "job-uid",
                                                  "controller": True}]},
                "spec": {"serviceAccountName": "default"},
            },
            ("Job", JOB): {"metadata": {"name": JOB, "namespace": NS, "uid": "job-uid", "ownerReferences": [
                {"apiVersion": "sft.dev/v1alpha1", "kind": "SFTJob", "name": JOB, "uid": "sftjob-uid", "controller": True}]}},
        }
        self.reviews: list = []
        self.fail_reads: int | None = None

    @property
    def pod(self) -> dict:
        return self.objects[("Pod", "llama-0-abcde")]

    @property
    def job(self) -> dict:
        return self.objects[("Job", JOB)]

    async def token_review(self, token, audiences):
        self.reviews.append(audiences)
        return self.review_status

    async def get(self, kind, namespace, name):
        from sft_operator.runtime.client import ApiError

        if self.fail_reads is not None:
            raise ApiError(self.fail_reads, "Forbidden", "no")
        obj = self.objects.get((kind, name)) if namespace == NS else None
        if obj is None or obj["metadata"].get("name") != name:
            raise ApiError(404, "NotFound", f"{kind} {name} not found")
        return obj


def _jwt(aud: list[str]) -> str:
    enc = base64.urlsafe_b64encode(json.dumps({"aud": aud, "exp": 4102444800}).encode()).rstrip(b"=").decode()
    return f"e30.{enc}.sig"


def _verify(kube: _FakeKube, token: str | None = None) -> Caller:
    verifier = progress_auth.KubernetesVerifier(kube, "sft.dev/progress")
    return asyncio.run(verifier(token or _jwt(["sft.dev/progress"]), NS, JOB))


def test_kubernetes_verifier_accepts_the_jobs_own_pod():
    kube = _FakeKube()
    caller = _verify(kube)
    assert (caller.namespace, caller.job, caller.pod_name, caller.pod_uid) == (NS, JOB, "llama-0-abcde", "pod-uid")
    assert caller.expires_at == 4102444800
    assert caller.sftjob_uid == "sftjob-uid"
    assert kube.reviews[0] == ["sft.dev/progress"]  # the review is bound to our audience


def _mutations():
    def unauthenticated(k):
        k.review_status["authenticated"] = False
        k.review_status["error"] = "token expired"

    def other_audience_returned(k):
        k.review_status["audiences"] = ["https://kubernetes.default.svc"]

    def user_not_sa(k):
        k.review_status["user"]["username"] = "alice"

    def sa_of_other_namespace(k):
        k.review_status["user"]["username"] = "system:serviceaccount:team-b:default"

    def not_pod_bound(k):
        k.review_status["user"]["extra"] = {}

    def pod_uid_mismatch(k):
        k.pod["metadata"]["uid"] = "recreated-pod"

    def pod_gone(k):
        k.pod["metadata"]["name"] = "someone-else"

    def label_of_other_job(k):
        k.pod["metadata"]["labels"] = {"sft.dev/job-name": "other"}

    def other_service_account(k):
        k.pod["spec"]["serviceAccountName"] = "builder"

    def pod_not_owned_by_job(k):
        k.pod["metadata"]["ownerReferences"] = None

    def job_uid_mismatch(k):
        k.job["metadata"]["uid"] = "another-job"

    def job_owned_by_other_sftjob(k):
        k.job["metadata"]["ownerReferences"][0]["name"] = "other"

    def job_owner_uid_mismatch(k):  # an SFTJob deleted and recreated with the same name
        k.job["metadata"]["ownerReferences"][0]["uid"] = "old-sftjob-uid"

    def job_not_controlled(k):
        k.job["metadata"]["ownerReferences"][0]["controller"] = False

    def sftjob_missing(k):
        del k.objects[("SFTJob", JOB)]

    return [
        (unauthenticated, 401), (other_audience_returned, 403), (user_not_sa, 403), (sa_of_other_namespace, 403),
        (not_pod_bound, 403), (pod_uid_mismatch, 403), (pod_gone, 403), (label_of_other_job, 403),
        (other_service_account, 403), (pod_not_owned_by_job, 403), (job_uid_mismatch, 403),
        (job_owned_by_other_sftjob, 403), (job_owner_uid_mismatch, 403), (job_not_controlled, 403),
        (sftjob_missing, 404),
    ]


@pytest.mark.parametrize(("mutate", "status"), _mutations(), ids=lambda v: getattr(v, "__name__", str(v)))
def test_kubernetes_verifier_rejects(mutate, status):
    kube = _FakeKube()
    mutate(kube)
    with pytest.raises(Rejected) as exc:
        _verify(kube)
    assert exc.value.status == status


def test_kubernetes_verifier_names_a_wrong_audience():
    kube = _FakeKube()
    kube.review_status["authenticated"] = False
    with pytest.raises(Rejected) as exc:
        _verify(kube, _jwt(["https://kubernetes.default.svc"]))
    assert (exc.value.status, exc.value.reason) == (403, "WrongAudience")


def test_kubernetes_verifier_treats_garbage_as_unauthenticated():
    kube = _FakeKube()
    kube.review_status["authenticated"] = False
    with pytest.raises(Rejected) as exc:
        _verify(kube, "not.a.token")
    assert exc.value.status == 401


def test_kubernetes_verifier_reports_api_trouble_as_unavailable():
    kube = _FakeKube()
    kube.fail_reads = 403  # the operator's own RBAC is missing
    with pytest.raises(Rejected) as exc:
        _verify(kube)
    assert exc.value.status == 503
