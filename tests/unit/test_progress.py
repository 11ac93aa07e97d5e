"""The progress endpoint with fake verifier and sink: auth, payload limits, coalescing, rate limit."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
from collections.abc import Awaitable, Callable

import aiohttp
import aiohttp.web
import pytest
from aiohttp.test_utils import TestClient, TestServer
from sft_operator import progress
from sft_operator.progress import Caller, Rejected, build_app, status_patch
from sft_operator.settings import OperatorSettings
from sft_trainer.config import ProgressReport
from tls_certs import self_signed

NS, JOB = "team-a", "llama"
URL = f"/v1/namespaces/{NS}/sftjobs/{JOB}/progress"
GOOD = "token-of-llama-pod"
OTHER_JOB = "token-of-another-jobs-pod"
WRONG_AUDIENCE = "token-for-the-api-server"


class FakeVerifier:
    """Stands in for TokenReview + ownership checks; counts calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    async def __call__(self, token: str, namespace: str, name: str) -> Caller:
        self.calls.append((token, namespace, name))
        await asyncio.sleep(0)
        if token == WRONG_AUDIENCE:
            raise Rejected(403, "WrongAudience", "the token's audience is not sft.dev/progress")
        if token == OTHER_JOB:
            raise Rejected(403, "Forbidden", "the calling pod does not belong to this SFTJob")
        if token != GOOD:
            raise Rejected(401, "Unauthenticated", "the token is not valid")
        if name == "missing":
            raise Rejected(404, "NotFound", "SFTJob not found")
        if (namespace, name) != (NS, JOB):
            raise Rejected(403, "Forbidden", "the calling pod does not belong to this SFTJob")
        return Caller(NS, JOB, "llama-0-abcde", "uid-1", f"system:serviceaccount:{NS}:default")


class FakeSink:
    def __init__(self, fail_times: int = 0) -> None:
        self.writes: list[tuple[str, str, ProgressReport, float]] = []
        self.fail_times = fail_times

    async def __call__(self, namespace: str, name: str, report: ProgressReport) -> None:
        if self.fail_times:
            self.fail_times -= 1
            raise ConnectionError("API server unavailable")
        self.writes.append((namespace, name, report, asyncio.get_running_loop().time()))

    @property
    def steps(self) -> list[int]:
        return [w[2].step for w in self.writes]


def report(step: int, total: int = 100, **extra) -> dict:
    return {"step": step, "totalSteps": total, "epoch": step / 50, "trainLoss": 2.0 - step / 100, **extra}


def auth(token: str = GOOD) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def scenario(test: Callable[[TestClient, FakeVerifier, FakeSink], Awaitable[None]], *,
             interval: float = 0.0, sink: FakeSink | None = None, max_body: int = progress.MAX_BODY_BYTES) -> None:
    async def main() -> None:
        verifier, fake_sink = FakeVerifier(), sink or FakeSink()
        app = build_app(verifier, fake_sink, min_interval_seconds=interval, max_body_bytes=max_body)
        async with TestClient(TestServer(app)) as client:
            await test(client, verifier, fake_sink)

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
        ns, name, written, _ = sink.writes[0]
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
        (auth(WRONG_AUDIENCE), 403, "WrongAudience"),
        (auth(OTHER_JOB), 403, "Forbidden"),
    ],
    ids=["no-token", "basic-auth", "empty-bearer", "invalid-token", "wrong-audience", "other-jobs-pod"],
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
        for _ in range(3):  # failures are not cached
            assert (await client.post(URL, json=report(1), headers=auth("forged"))).status == 401
        assert len(verifier.calls) == 4

    scenario(test)


def test_concurrent_posts_share_one_verification():
    async def test(client, verifier, sink):
        responses = await asyncio.gather(*(client.post(URL, json=report(i), headers=auth()) for i in range(8)))
        assert [r.status for r in responses] == [202] * 8
        assert len(verifier.calls) == 1

    scenario(test)


def test_cache_expires_and_never_outlives_the_token():
    now = [1000.0]
    cache = progress.VerificationCache(ttl_seconds=60, clock=lambda: now[0])
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
    cache = progress.VerificationCache(max_entries=10)
    for i in range(100):
        cache.put(f"k{i}", Caller(NS, JOB, "p", "u", "sa"))
    assert len(cache._entries) <= 10
    assert cache.get("k99", NS, JOB) is not None


# ---- coalescing and rate limit ----------------------------------------------------------------


def test_reports_within_the_interval_are_coalesced_into_one_write():
    async def test(client, verifier, sink):
        assert (await client.post(URL, json=report(1), headers=auth())).status == 202
        await settle()
        assert sink.steps == [1]  # an idle job's first report is written at once
        for step in (2, 3, 4, 5):
            extra = {"evalLoss": 1.25} if step == 3 else {}
            assert (await client.post(URL, json=report(step, **extra), headers=auth())).status == 202
        await settle()
        assert sink.steps == [1]  # held back by the rate limit
        await asyncio.sleep(1.2)
        assert sink.steps == [1, 5]  # one write with the latest step...
        assert sink.writes[1][2].eval_loss == 1.25  # ...keeping the eval loss reported in between
        assert sink.writes[1][3] - sink.writes[0][3] >= 1.0 * 0.99

    scenario(test, interval=1.0)


def test_writes_are_rate_limited_per_job_not_globally():
    async def test(client, verifier, sink):
        start = asyncio.get_running_loop().time()
        for step in range(1, 40):
            assert (await client.post(URL, json=report(step), headers=auth())).status == 202
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.35)
        elapsed = asyncio.get_running_loop().time() - start
        times = [w[3] for w in sink.writes]
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert all(g >= 0.3 * 0.99 for g in gaps), gaps
        assert len(sink.writes) <= elapsed / 0.3 + 1
        assert sink.steps[-1] == 39  # the latest report always lands

    scenario(test, interval=0.3)


def test_a_final_report_is_written_promptly():
    async def test(client, verifier, sink):
        assert (await client.post(URL, json=report(10), headers=auth())).status == 202
        await settle()
        assert (await client.post(URL, json=report(11), headers=auth())).status == 202
        final = report(100, outputModel="pvc://models/llama", bestCheckpoint="pvc://models/llama/checkpoint-90")
        assert (await client.post(URL, json=final, headers=auth())).status == 202
        await settle(0.2)
        assert sink.steps == [10, 100]  # not held back for the 30 s interval
        assert sink.writes[-1][2].output_model == "pvc://models/llama"

    scenario(test, interval=30)


def test_a_failed_write_is_retried_with_the_latest_report():
    async def test(client, verifier, sink):
        assert (await client.post(URL, json=report(1), headers=auth())).status == 202
        await asyncio.sleep(1.0)
        assert sink.steps == [1]

    scenario(test, interval=0.1, sink=FakeSink(fail_times=2))


def test_idle_jobs_are_forgotten():
    async def test(client, verifier, sink):
        assert (await client.post(URL, json=report(1), headers=auth())).status == 202
        coalescer = client.server.app[progress.APP_COALESCER]
        await settle()
        assert coalescer.active_jobs == 1
        await asyncio.sleep(1.5)
        assert coalescer.active_jobs == 0

    scenario(test, interval=0.5)


# ---- the status patch --------------------------------------------------------------------------


def test_status_patch_maps_report_to_status_fields():
    r = ProgressReport.model_validate(
        report(50, evalLoss=1.1, bestEvalLoss=1.0, learningRate=2e-5, tokensPerSecond=900.0, etaSeconds=120,
               effectiveBatchSize=16, generalLossBefore=2.5, generalLossAfter=2.6)
    )
    assert status_patch(r) == {
        "status": {
            "progress": {"percent": 50, "step": 50, "totalSteps": 100, "epoch": 1.0, "etaSeconds": 120},
            "metrics": {
                "trainLoss": 1.5,
                "evalLoss": 1.1,
                "bestEvalLoss": 1.0,
                "learningRate": 2e-5,
                "tokensPerSecond": 900.0,
                "generalLossBefore": 2.5,
                "generalLossAfter": 2.6,
            },
            "effectiveBatchSize": 16,
        }
    }


def test_status_patch_leaves_unknown_metrics_alone_and_completes_the_eta():
    r = ProgressReport.model_validate({"step": 100, "totalSteps": 100, "epoch": 3, "outputModel": "pvc://m/out"})
    patch = status_patch(r)["status"]
    assert patch["progress"]["percent"] == 100 and patch["progress"]["etaSeconds"] == 0
    assert "metrics" not in patch  # a merge patch without them keeps the last known losses
    assert patch["output"] == {"model": "pvc://m/out"}


def test_status_patch_fits_the_crd_schema():
    from sft_operator.api import SFTJobStatus

    r = ProgressReport.model_validate(report(7, etaSeconds=3, outputModel="pvc://a/b", bestCheckpoint="pvc://a/c"))
    SFTJobStatus.model_validate(status_patch(r)["status"])


# ---- TLS and startup ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_refuses_plaintext_unless_allowed():
    settings = OperatorSettings(progress_port=_free_port())
    with pytest.raises(RuntimeError, match="progress-tls-cert"):
        asyncio.run(progress.start_progress_server(settings, verifier=FakeVerifier(), sink=FakeSink()))


def test_serves_tls_with_the_configured_cert(tmp_path):
    cert, key = self_signed(tmp_path)
    port = _free_port()
    settings = OperatorSettings(progress_port=port, progress_tls_cert=str(cert), progress_tls_key=str(key),
                                progress_min_interval_seconds=0)
    sink = FakeSink()

    async def main():
        await progress.start_progress_server(settings, verifier=FakeVerifier(), sink=sink, host="127.0.0.1")
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
            await settle()
            assert sink.steps == [3]
        finally:
            await progress.stop_progress_server()

    asyncio.run(main())


def test_a_renewed_certificate_is_served_without_a_restart(tmp_path):
    import os
    import shutil

    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    cert, key = self_signed(first)
    new_cert, new_key = self_signed(second)
    port = _free_port()

    async def main():
        context = progress.ssl_context(str(cert), str(key))
        runner = aiohttp.web.AppRunner(build_app(FakeVerifier(), FakeSink()))
        await runner.setup()
        await aiohttp.web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
        reload = asyncio.create_task(progress.reload_certificates(context, str(cert), str(key),
                                                                  progress.log, interval=0.05))
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
            reload.cancel()
            await runner.cleanup()

    asyncio.run(main())


def test_plaintext_when_explicitly_allowed():
    port = _free_port()
    settings = OperatorSettings(progress_port=port, progress_allow_plaintext=True)

    async def main():
        await progress.start_progress_server(settings, verifier=FakeVerifier(), sink=FakeSink(), host="127.0.0.1")
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                    assert response.status == 200
        finally:
            await progress.stop_progress_server()

    asyncio.run(main())


def test_unverified_audience_peek_handles_garbage():
    def jwt(claims: dict) -> str:
        enc = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        return f"e30.{enc}.sig"

    assert progress.token_audiences(jwt({"aud": ["sft.dev/progress", "x"]})) == ["sft.dev/progress", "x"]
    assert progress.token_audiences(jwt({"aud": "api"})) == ["api"]
    assert progress.token_audiences("not-a-jwt") == []
    assert progress.token_audiences("a.!!!.c") == []


# ---- the Kubernetes verifier's decision logic, with fake API objects ---------------------------


class _FakeApis:
    """Just enough of the kubernetes client APIs for KubernetesVerifier, as real model objects."""

    def __init__(self) -> None:
        from kubernetes import client

        self.c = client
        self.review_status = client.V1TokenReviewStatus(
            authenticated=True,
            audiences=["sft.dev/progress"],
            user=client.V1UserInfo(
                username=f"system:serviceaccount:{NS}:default",
                extra={progress.POD_NAME_EXTRA: ["llama-0-abcde"], progress.POD_UID_EXTRA: ["pod-uid"]},
            ),
        )
        self.sftjobs = {JOB: {"metadata": {"name": JOB, "uid": "sftjob-uid"}}}
        self.pod = client.V1Pod(
            metadata=client.V1ObjectMeta(
                name="llama-0-abcde", namespace=NS, uid="pod-uid", labels={"sft.dev/job-name": JOB},
                owner_references=[client.V1OwnerReference(api_version="batch/v1", kind="Job", name=JOB,
                                                          uid="job-uid", controller=True)],
            ),
            spec=client.V1PodSpec(containers=[client.V1Container(name="trainer")], service_account_name="default"),
        )
        self.job = client.V1Job(
            metadata=client.V1ObjectMeta(
                name=JOB, namespace=NS, uid="job-uid",
                owner_references=[client.V1OwnerReference(api_version="sft.dev/v1alpha1", kind="SFTJob", name=JOB,
                                                          uid="sftjob-uid", controller=True)],
            )
        )
        self.reviews: list = []

    def _not_found(self):
        from kubernetes.client.exceptions import ApiException

        return ApiException(status=404, reason="Not Found")

    def create_token_review(self, body):
        self.reviews.append(body)
        return self.c.V1TokenReview(spec=body.spec, status=self.review_status)

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        if namespace != NS or name not in self.sftjobs:
            raise self._not_found()
        return self.sftjobs[name]

    def read_namespaced_pod(self, name, namespace):
        if (name, namespace) != (self.pod.metadata.name, NS):
            raise self._not_found()
        return self.pod

    def read_namespaced_job(self, name, namespace):
        if (name, namespace) != (self.job.metadata.name, NS):
            raise self._not_found()
        return self.job


def _verifier(apis: _FakeApis) -> progress.KubernetesVerifier:
    verifier = progress.KubernetesVerifier(None, "sft.dev/progress")
    verifier._auth = verifier._core = verifier._batch = verifier._custom = apis
    return verifier


def _jwt(aud: list[str]) -> str:
    enc = base64.urlsafe_b64encode(json.dumps({"aud": aud, "exp": 4102444800}).encode()).rstrip(b"=").decode()
    return f"e30.{enc}.sig"


def test_kubernetes_verifier_accepts_the_jobs_own_pod():
    apis = _FakeApis()
    caller = _verifier(apis).verify(_jwt(["sft.dev/progress"]), NS, JOB)
    assert (caller.namespace, caller.job, caller.pod_name, caller.pod_uid) == (NS, JOB, "llama-0-abcde", "pod-uid")
    assert caller.expires_at == 4102444800
    assert apis.reviews[0].spec.audiences == ["sft.dev/progress"]  # the review is bound to our audience


def _mutations():
    def unauthenticated(a):
        a.review_status.authenticated = False
        a.review_status.error = "token expired"

    def other_audience_returned(a):
        a.review_status.audiences = ["https://kubernetes.default.svc"]

    def user_not_sa(a):
        a.review_status.user.username = "alice"

    def sa_of_other_namespace(a):
        a.review_status.user.username = "system:serviceaccount:team-b:default"

    def not_pod_bound(a):
        a.review_status.user.extra = {}

    def pod_uid_mismatch(a):
        a.pod.metadata.uid = "recreated-pod"

    def pod_gone(a):
        a.pod.metadata.name = "someone-else"

    def label_of_other_job(a):
        a.pod.metadata.labels = {"sft.dev/job-name": "other"}

    def other_service_account(a):
        a.pod.spec.service_account_name = "builder"

    def pod_not_owned_by_job(a):
        a.pod.metadata.owner_references = None

    def job_uid_mismatch(a):
        a.job.metadata.uid = "another-job"

    def job_owned_by_other_sftjob(a):
        a.job.metadata.owner_references[0].name = "other"

    def job_owner_uid_mismatch(a):  # an SFTJob deleted and recreated with the same name
        a.job.metadata.owner_references[0].uid = "old-sftjob-uid"

    def job_not_controlled(a):
        a.job.metadata.owner_references[0].controller = False

    def sftjob_missing(a):
        a.sftjobs.clear()

    return [
        (unauthenticated, 401), (other_audience_returned, 403), (user_not_sa, 403), (sa_of_other_namespace, 403),
        (not_pod_bound, 403), (pod_uid_mismatch, 403), (pod_gone, 403), (label_of_other_job, 403),
        (other_service_account, 403), (pod_not_owned_by_job, 403), (job_uid_mismatch, 403),
        (job_owned_by_other_sftjob, 403), (job_owner_uid_mismatch, 403), (job_not_controlled, 403),
        (sftjob_missing, 404),
    ]


@pytest.mark.parametrize(("mutate", "status"), _mutations(), ids=lambda v: getattr(v, "__name__", str(v)))
def test_kubernetes_verifier_rejects(mutate, status):
    apis = _FakeApis()
    mutate(apis)
    with pytest.raises(Rejected) as exc:
        _verifier(apis).verify(_jwt(["sft.dev/progress"]), NS, JOB)
    assert exc.value.status == status


def test_kubernetes_verifier_names_a_wrong_audience():
    apis = _FakeApis()
    apis.review_status.authenticated = False
    with pytest.raises(Rejected) as exc:
        _verifier(apis).verify(_jwt(["https://kubernetes.default.svc"]), NS, JOB)
    assert (exc.value.status, exc.value.reason) == (403, "WrongAudience")


def test_kubernetes_verifier_treats_garbage_as_unauthenticated():
    apis = _FakeApis()
    apis.review_status.authenticated = False
    with pytest.raises(Rejected) as exc:
        _verifier(apis).verify("not.a.token", NS, JOB)
    assert exc.value.status == 401


def test_kubernetes_verifier_reports_api_trouble_as_unavailable():
    from kubernetes.client.exceptions import ApiException

    apis = _FakeApis()

    def forbidden(*args):
        raise ApiException(status=403, reason="Forbidden")  # the operator's own RBAC is missing

    apis.read_namespaced_pod = forbidden
    with pytest.raises(Rejected) as exc:
        _verifier(apis).verify(_jwt(["sft.dev/progress"]), NS, JOB)
    assert exc.value.status == 503


def test_status_sink_patches_status_and_skips_gauges_of_finished_jobs():
    from sft_operator import metrics

    calls = []

    class FakeCustom:
        phase = "Running"

        def patch_namespaced_custom_object_status(self, group, version, namespace, plural, name, body):
            calls.append((group, version, namespace, plural, name, body))
            return {"status": {"phase": self.phase}}

    sink = progress.KubernetesStatusSink(None)
    sink._custom = FakeCustom()
    r = ProgressReport.model_validate(report(10))
    asyncio.run(sink(NS, "sink-job", r))
    assert calls[0][:5] == ("sft.dev", "v1alpha1", NS, "sftjobs", "sink-job")
    assert calls[0][5] == status_patch(r)
    sample = {"namespace": NS, "sftjob": "sink-job"}
    assert metrics.REGISTRY.get_sample_value("sft_job_train_loss", sample) == 1.9
    metrics.remove_job(NS, "sink-job")
    sink._custom.phase = "Succeeded"
    asyncio.run(sink(NS, "sink-job", r))
    assert metrics.REGISTRY.get_sample_value("sft_job_train_loss", sample) is None
