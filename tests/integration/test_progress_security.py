"""Progress endpoint security against the real API server (KEP-2779 style).

The operator runs as a subprocess with TLS (a self-signed cert made here) and talks to the test
control plane: TokenReview with our audience, then pod -> Job -> SFTJob ownership. Tokens are real
projected service-account tokens from TokenRequest, bound to the Job controller's pods. A token of
the job's own pod is accepted and status moves; every other caller is rejected and the progress in
status stays exactly as it was.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import requests
from kubernetes import client

from sft_operator.api import GROUP, PLURAL, VERSION
from builders import to_create
from support import OperatorProcess
from tls_certs import self_signed

pytestmark = pytest.mark.cluster

AUDIENCE = "sft.dev/progress"
# A node selector no node has: the Job's pods exist (objects to bind tokens to) but never run.
NOWHERE = {"sft.dev/test-nowhere": "true"}


class ProgressServer:
    """The operator, serving the progress endpoint over TLS for one namespace."""

    def __init__(self, kubeconfig: Path, tmp: Path, namespace: str) -> None:
        self.cert, key = self_signed(tmp)
        self.op = OperatorProcess(kubeconfig, tmp / "operator.log")
        self.port = self.op.ports["progress"]
        self.op.args = ["-n", namespace, "--log-format", "plain", "--progress-tls-cert", str(self.cert),
                        "--progress-tls-key", str(key), "--token-audience", AUDIENCE,
                        "--progress-port", str(self.port), "--metrics-port", str(self.op.ports["metrics"]),
                        "--health-port", str(self.op.ports["health"])]

    def start(self) -> None:
        self.op.start()

    def stop(self) -> None:
        self.op.stop()

    def url(self, namespace: str, name: str) -> str:
        return f"https://127.0.0.1:{self.port}/v1/namespaces/{namespace}/sftjobs/{name}/progress"

    def post(self, namespace: str, name: str, *, token: str | None, body: bytes | dict) -> requests.Response:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        return requests.post(self.url(namespace, name), data=data, headers=headers, verify=str(self.cert), timeout=30)

    def gauge(self, name: str, namespace: str, job: str) -> float | None:
        pattern = rf'^{name}\{{namespace="{namespace}",sftjob="{job}"\}} (\S+)$'
        found = re.search(pattern, self.op.metrics(), re.MULTILINE)
        return float(found.group(1)) if found else None


@pytest.fixture
def server(control_plane, namespace, tmp_path):
    srv = ProgressServer(control_plane.kubeconfig, tmp_path, namespace)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        print(f"--- operator log ---\n{srv.op.log_tail(100)}")


def owned_job(name: str, owner: dict) -> dict:
    """A Job the SFTJob controls, shaped like the renderer's: pods labelled sft.dev/job-name."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "labels": {"sft.dev/job-name": owner["metadata"]["name"]},
            "ownerReferences": [{
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "SFTJob",
                "name": owner["metadata"]["name"],
                "uid": owner["metadata"]["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }],
        },
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"sft.dev/job-name": owner["metadata"]["name"]}},
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": NOWHERE,
                    "automountServiceAccountToken": False,
                    "containers": [{"name": "trainer", "image": "trainer:test", "command": ["true"]}],
                },
            },
        },
    }


class Cluster:
    def __init__(self, control_plane, namespace: str) -> None:
        self.cp = control_plane
        self.ns = namespace
        self.core = client.CoreV1Api(control_plane.api)
        self.batch = client.BatchV1Api(control_plane.api)
        self.custom = client.CustomObjectsApi(control_plane.api)

    def create_sftjob_with_pod(self, name: str) -> tuple[dict, client.V1Pod]:
        owner = self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, to_create(name, {
            "model": {"source": "pvc://models/tiny"},
            "dataset": {"train": {"source": "pvc://data/train.jsonl"}},
            "hyperparameters": {"maxSteps": 100},
            "output": {"destination": f"pvc://models/{name}"},
            "resources": {"gpusPerNode": 0},
        }))
        self.batch.create_namespaced_job(self.ns, owned_job(name, owner))
        pod = self.cp.wait_for(
            lambda: next(iter(self.core.list_namespaced_pod(self.ns, label_selector=f"job-name={name}").items), None),
            60, f"the Job controller to create a pod of {name}")
        return owner, pod

    def token(self, *, audiences: list[str], pod: client.V1Pod | None = None, sa: str = "default") -> str:
        bound = None
        if pod is not None:
            bound = client.V1BoundObjectReference(kind="Pod", api_version="v1", name=pod.metadata.name,
                                                  uid=pod.metadata.uid)
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=audiences, expiration_seconds=600, bound_object_ref=bound)
        )
        return self.core.create_namespaced_service_account_token(sa, self.ns, request).status.token

    def status(self, name: str) -> dict:
        obj = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)
        return obj.get("status") or {}

    def reported(self, name: str) -> dict:
        """What the trainer reported into status (the operator derives the rest)."""
        status = self.status(name)
        return {k: status.get(k) for k in ("progress", "metrics", "output")}


def progress_report(step: int, loss: float) -> dict:
    return {"step": step, "totalSteps": 100, "epoch": step / 50, "trainLoss": loss, "learningRate": 2e-5,
            "tokensPerSecond": 1500.0, "etaSeconds": 60}


def test_progress_security(control_plane, namespace, server):
    k = Cluster(control_plane, namespace)
    _, pod_a = k.create_sftjob_with_pod("job-a")
    _, pod_b = k.create_sftjob_with_pod("job-b")
    own_token = k.token(audiences=[AUDIENCE], pod=pod_a)

    # The job's own pod: accepted, and status.progress / status.metrics follow.
    response = server.post(namespace, "job-a", token=own_token, body=progress_report(7, 1.75))
    assert response.status_code == 202, response.text
    status = control_plane.wait_for(
        lambda: (s := k.status("job-a")).get("progress", {}).get("step") == 7 and s, 30, "status.progress of job-a")
    assert status["progress"] == {"percent": 7, "step": 7, "totalSteps": 100, "epoch": 0.14, "etaSeconds": 60,
                                  "stage": "Training"}  # a report without a stage comes from the training loop
    assert status["metrics"] == {"trainLoss": 1.75, "learningRate": 2e-5, "tokensPerSecond": 1500.0}
    assert server.gauge("sft_job_train_loss", namespace, "job-a") == 1.75

    # A second report from the same pod (served from the verification cache) moves it again.
    assert server.post(namespace, "job-a", token=own_token, body=progress_report(9, 1.5)).status_code == 202
    control_plane.wait_for(lambda: k.status("job-a").get("progress", {}).get("step") == 9, 30, "step 9")
    before_a, before_b = k.reported("job-a"), k.reported("job-b")

    foreign_pod_token = k.token(audiences=[AUDIENCE], pod=pod_b)
    wrong_audience_token = k.token(audiences=["https://kubernetes.default.svc.cluster.local"], pod=pod_a)
    unbound_token = k.token(audiences=[AUDIENCE])  # our audience, but bound to no pod
    oversized = json.dumps({**progress_report(50, 0.1), "message": "x" * 1000}).encode() + b" " * (20 * 1024)
    evil = progress_report(99, 0.01)

    rejected = {
        "wrong audience": (server.post(namespace, "job-a", token=wrong_audience_token, body=evil), (403,)),
        "pod of another SFTJob": (server.post(namespace, "job-a", token=foreign_pod_token, body=evil), (403,)),
        "token bound to no pod": (server.post(namespace, "job-a", token=unbound_token, body=evil), (403,)),
        "no token": (server.post(namespace, "job-a", token=None, body=evil), (401,)),
        "garbage token": (server.post(namespace, "job-a", token="not.a.token", body=evil), (401,)),
        "malformed JSON": (server.post(namespace, "job-a", token=own_token, body=b'{"step": 99,'), (400,)),
        "invalid report": (server.post(namespace, "job-a", token=own_token,
                                       body={**evil, "trainLoss": -1.0}), (422,)),
        "oversized payload": (server.post(namespace, "job-a", token=own_token, body=oversized), (413,)),
        "own token, other job": (server.post(namespace, "job-b", token=own_token, body=evil), (403,)),
        "unknown SFTJob": (server.post(namespace, "no-such-job", token=own_token, body=evil), (404,)),
    }
    for what, (response, expected) in rejected.items():
        assert response.status_code in expected, f"{what}: {response.status_code} {response.text}"

    time.sleep(3.0)  # longer than the rate limit (2 s): a write would have landed
    assert k.reported("job-a") == before_a
    assert k.reported("job-b") == before_b
    assert before_b["progress"] is None
    assert server.gauge("sft_job_train_loss", namespace, "job-a") == 1.5
    assert server.gauge("sft_job_train_loss", namespace, "job-b") is None

    # Control: the other job's pod is accepted for its own job, so the refusals above were specific.
    response = server.post(namespace, "job-b", token=foreign_pod_token, body=progress_report(1, 2.0))
    assert response.status_code == 202, response.text
    control_plane.wait_for(lambda: k.status("job-b").get("progress", {}).get("step") == 1, 30, "job-b's own progress")
    assert k.reported("job-a") == before_a
