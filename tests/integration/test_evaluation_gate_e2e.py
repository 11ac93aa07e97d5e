"""The evaluation gate end to end on the real node (issue #21's "done when"): two tiny SFTJobs run by the
helm-installed operator in the built images, one whose gates pass and one with a Fail gate it cannot pass,
both tracked in a real `mlflow server` (bound to the node's bridge address, as in test_storage_end_to_end)
with a registered model. What is asserted is what a user and a pipeline see: phase and reason, the
EvaluationPassed condition and `kubectl wait` on it, status.evaluation, the Events, the gauge, the model's
place on the claim, and the Model Registry's versions, tags and alias. Measured on 2 busy cores: both jobs
apply -> end in ~106 s side by side; the module ~10.5 min including the cluster's start and image reuse."""

from __future__ import annotations

import json
import random
import re

import pytest
from kubernetes import client

import sft_devcluster as devcluster
from sft_devcluster import node as realnode
from sft_trainer import tiny as tiny_assets_module
from storage_servers import start_mlflow, stop

from .test_end_to_end import installed  # noqa: F401  (the module's helm release)

pytestmark = [pytest.mark.cluster, pytest.mark.images, pytest.mark.trainer, pytest.mark.slow]

REGISTERED = "tiny-gated"


@pytest.fixture(scope="module")
def mlflow(real_node, tmp_path_factory):
    server = start_mlflow(tmp_path_factory.mktemp("mlflow-gate"), host=realnode.NODE_IP)
    yield server
    stop(server.proc)


@pytest.fixture(scope="module")
def prompts(installed) -> str:
    """Held-out prompts of the tiny tasks on the `datasets` claim."""
    folder = devcluster.node_objects.volume_path(installed.cluster.state_dir, installed.work, "datasets") / "gate"
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(11)
    rows = []
    for _ in range(8):
        row = tiny_assets_module.task_row(rng)
        rows.append({"prompt": row["instruction"] + (f"\n{row['input']}" if row.get("input") else ""),
                     "expected": row["output"]})
    (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "prompts.jsonl").chmod(0o644)
    folder.chmod(0o755)
    return "pvc://datasets/gate/prompts.jsonl"


def apply(installed, name: str, tmp_path, mlflow, prompts: str, gates: list[dict]) -> float:
    return installed.apply(
        name, tmp_path, hyperparameters={"maxSteps": 60},
        dataset={"train": {"source": "pvc://datasets/tiny/data/chat.jsonl"}},
        evaluation={"strategy": "epoch", "gates": gates,
                    "prompts": {"source": prompts, "maxNewTokens": 8}},
        tracking={"mlflow": {"trackingUri": mlflow.uri, "experiment": "sft-gate-e2e", "registeredModel": REGISTERED}},
        runPolicy={"backoffLimit": 2},
    )


def condition(status: dict, kind: str) -> dict:
    return next((c for c in status.get("conditions", []) if c["type"] == kind), {})


def test_a_passing_job_is_registered_with_the_alias_and_a_failing_one_is_rejected(installed, mlflow, prompts,
                                                                                 tmp_path):
    passing = apply(installed, "gate-pass", tmp_path, mlflow, prompts,
                    [{"metric": "evalLoss", "minChange": 0.5}, {"metric": "forgettingDelta", "threshold": 2.0},
                     {"metric": "contains", "threshold": 0.0}])
    failing = apply(installed, "gate-fail", tmp_path, mlflow, prompts,
                    [{"metric": "evalLoss", "minChange": 0.5}, {"metric": "exactMatch", "threshold": 1.0}])
    # What a GitOps pipeline runs: it returns once the gates passed.
    waited = installed.cluster.kubectl("wait", "-n", installed.work, "--for=condition=EvaluationPassed",
                                       "sftjob/gate-pass", "--timeout=600s", check=False)
    good = installed.follow("gate-pass", passing)
    bad = installed.follow("gate-fail", failing)
    print(f"\ngate-pass: apply -> {good.status.get('phase')} {good.finished_after:.1f} s; "
          f"gate-fail: apply -> {bad.status.get('phase')} {bad.finished_after:.1f} s")
    assert waited.returncode == 0, waited.stderr + installed.explain("gate-pass", good.status)

    # The passing job: Succeeded, every gate's numbers in status, the model where the pipeline reads it.
    status = good.status
    assert (status["phase"], status["reason"]) == ("Succeeded", "Completed"), installed.explain("gate-pass", status)
    assert (condition(status, "EvaluationPassed")["status"], condition(status, "EvaluationPassed")["reason"]) == \
        ("True", "GatesPassed")
    gates = {g["metric"]: g for g in status["evaluation"]["gates"]}
    assert status["evaluation"]["passed"] is True and set(gates) == {"evalLoss", "forgettingDelta", "contains"}
    assert gates["evalLoss"]["base"] - gates["evalLoss"]["tuned"] >= 0.5
    assert (installed.models / "gate-pass" / "model" / "config.json").exists()

    # The failing job: Failed/EvaluationFailed at once (not retried), naming the gate; the model under rejected/.
    status = bad.status
    assert (status["phase"], status["reason"]) == ("Failed", "EvaluationFailed"), installed.explain("gate-fail", status)
    failed = condition(status, "Failed")["message"]
    assert "exited with code 80: evaluation gate failed: gate exactMatch: tuned" in failed and "< threshold 1" in failed
    verdict = condition(status, "EvaluationPassed")
    assert (verdict["status"], verdict["reason"]) == ("False", "EvaluationFailed")
    assert status["evaluation"]["passed"] is False
    assert len(installed.pods("gate-fail")) == 1  # exit 80 is non-retriable: no second pod
    out = installed.models / "gate-fail"
    assert (out / "rejected" / "model" / "config.json").exists() and not (out / "model").exists()

    # kubectl get sftjobs shows the verdicts; Events say them; the gauge has them.
    table = installed.cluster.kubectl("get", "sftjobs", "-n", installed.work).stdout
    assert re.search(r"gate-pass\s+Succeeded\s+100\s+\S+\s+GatesPassed", table), table
    assert re.search(r"gate-fail\s+Failed\s+100\s+\S+\s+EvaluationFailed", table), table
    assert any(e.reason == "GatesPassed" and e.type == "Normal" for e in installed.events("gate-pass"))
    assert any(e.reason == "EvaluationFailed" and e.type == "Warning" for e in installed.events("gate-fail"))
    scraped = installed.metrics()
    assert f'sft_job_evaluation_passed{{namespace="{installed.work}",sftjob="gate-pass"}} 1.0' in scraped
    assert f'sft_job_evaluation_passed{{namespace="{installed.work}",sftjob="gate-fail"}} 0.0' in scraped

    # The Model Registry: both registered, tagged with their SFTJob's uid; the alias only on the passing one.
    ml = mlflow.client()
    uids = {name: client.CustomObjectsApi(installed.cluster.api).get_namespaced_custom_object(
        "sft.dev", "v1alpha1", installed.work, "sftjobs", name)["metadata"]["uid"] for name in ("gate-pass", "gate-fail")}
    versions = {v.tags["sft.uid"]: v for v in ml.search_model_versions(f"name='{REGISTERED}'")}
    assert set(versions) == set(uids.values())
    promoted = ml.get_model_version_by_alias(REGISTERED, "candidate")
    assert promoted.tags["sft.uid"] == uids["gate-pass"] and promoted.source == "pvc://models/gate-pass/model"
    rejected = versions[uids["gate-fail"]]
    assert rejected.source == "pvc://models/gate-fail/rejected/model" and rejected.tags["sft.evaluation"] == "failed"
    assert "candidate" not in (rejected.aliases or [])
    assert ml.get_run(good.status["output"]["mlflowRunId"]).data.metrics["evaluation_passed"] == 1.0
