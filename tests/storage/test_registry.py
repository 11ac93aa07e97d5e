"""Promotion in the MLflow Model Registry against a real `mlflow server` (SQLite backend, which has the registry):
a run whose gates passed becomes a new version with the alias; a rejected one a version without it."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "trainer_image"))

from sft_contract.spec import MlflowSpec, TrainingSpec  # noqa: E402
from sft_trainer.tracking import MlflowSink, run_params  # noqa: E402
from storage_servers import free_port  # noqa: E402

SPEC = TrainingSpec.model_validate({
    "model": {"source": "org/model"},
    "dataset": {"train": {"source": "/data/train.jsonl"}},
    "output": {"destination": "s3://models/run-1"},
})


def evaluation(passed: bool) -> dict:
    return {"passed": passed, "gates": [
        {"metric": "evalLoss", "direction": "lower", "base": 2.5, "tuned": 1.1 if passed else 2.4, "minChange": 0.5,
         "onFail": "Fail", "passed": passed},
    ]}


def finished(uid: str, passed: bool) -> dict:
    model = "s3://models/run-1/model" if passed else "s3://models/run-1/rejected/model"
    return {"steps": 10, "totalSteps": 10, "runId": uid, "outputModel": model, "evaluation": evaluation(passed)}


def sink(server, tmp_path: Path, name: str, **extra) -> MlflowSink:
    settings = MlflowSpec(tracking_uri=server.uri, experiment="sft-registry", registered_model=name, **extra)
    return MlflowSink(settings, tmp_path, run_params(SPEC, 1), run_name="run")


def test_a_passing_run_is_a_new_version_with_the_alias_a_failing_one_without(mlflow_server, tmp_path):
    client = mlflow_server.client()
    name = f"tiny-sft-{free_port()}"

    good = sink(mlflow_server, tmp_path / "a", name)
    good.end(finished("uid-pass", True), "s3://models/run-1")
    assert good.warning is None and good.registered == (name, "1", "candidate")
    v1 = client.get_model_version(name, "1")
    assert v1.source == "s3://models/run-1/model" and v1.run_id == good.run_id
    assert v1.tags["sft.uid"] == "uid-pass" and v1.tags["sft.evaluation"] == "passed"
    assert v1.tags["sft.gate.evalLoss"].startswith("passed: base 2.5, tuned 1.1")
    assert client.get_model_version_by_alias(name, "candidate").version == "1"
    run = client.get_run(good.run_id)
    assert run.data.metrics["gate_evalLoss_base"] == 2.5 and run.data.metrics["gate_evalLoss_tuned"] == 1.1
    assert run.data.metrics["evaluation_passed"] == 1.0 and run.data.tags["sft.evaluation"] == "passed"

    bad = sink(mlflow_server, tmp_path / "b", name)
    bad.end(finished("uid-fail", False), "s3://models/run-1")
    assert bad.warning is None and bad.registered == (name, "2", None)
    v2 = client.get_model_version(name, "2")
    assert v2.source == "s3://models/run-1/rejected/model" and v2.tags["sft.evaluation"] == "failed"
    assert v2.tags["sft.gate.evalLoss"].startswith("failed: base 2.5, tuned 2.4")
    # The alias still points at the version that passed.
    assert client.get_model_version_by_alias(name, "candidate").version == "1"
    assert client.get_run(bad.run_id).data.metrics["evaluation_passed"] == 0.0


def test_the_alias_is_configurable_and_a_failed_run_registers_nothing(mlflow_server, tmp_path):
    client = mlflow_server.client()
    name = f"tiny-sft-{free_port()}"
    failed = sink(mlflow_server, tmp_path / "a", name, alias="staging")
    failed.end(finished("uid-1", True), None, status="FAILED")  # training failed: nothing to register
    assert failed.registered is None
    ok = sink(mlflow_server, tmp_path / "b", name, alias="staging")
    ok.end(finished("uid-2", True), "s3://models/run-1")
    assert client.get_model_version_by_alias(name, "staging").tags["sft.uid"] == "uid-2"


def test_jobs_that_start_and_end_together_each_get_their_run_and_their_version(mlflow_server, tmp_path):
    """A sweep: four jobs create the same new experiment and register into the same new model at once
    (the losers of those races used to get no MLflow run at all, so nothing was registered)."""
    client = mlflow_server.client()
    name = f"sweep-{free_port()}"
    settings = [MlflowSpec(tracking_uri=mlflow_server.uri, experiment=name, registered_model=name) for _ in range(4)]
    sinks = [MlflowSink(s, tmp_path / str(i), run_params(SPEC, 1), run_name=f"run-{i}") for i, s in enumerate(settings)]
    threads = [threading.Thread(target=s.end, args=(finished(f"uid-{i}", i % 2 == 0), "s3://models/run-1"))
               for i, s in enumerate(sinks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [s.warning for s in sinks] == [None] * 4
    versions = {v.tags["sft.uid"]: v for v in client.search_model_versions(f"name='{name}'")}
    assert sorted(versions) == [f"uid-{i}" for i in range(4)]
    assert {v.run_id for v in versions.values()} == {s.run_id for s in sinks}
    assert client.get_model_version_by_alias(name, "candidate").tags["sft.uid"] in ("uid-0", "uid-2")


def test_an_unreachable_registry_is_a_warning_not_a_failure(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    s = MlflowSink(MlflowSpec(tracking_uri=uri, registered_model="m"), tmp_path, run_params(SPEC, 1))
    s.end(finished("uid", True), "s3://models/run-1")
    assert s.registered is None and s.warning.startswith(f"MLflow at {uri}")


@pytest.mark.parametrize("bad", ["a/b", "a:b", ""])
def test_registered_model_names_mlflow_refuses_are_refused_in_the_spec(bad):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="registered_model|registeredModel"):
        MlflowSpec.model_validate({"trackingUri": "http://mlflow:5000", "registeredModel": bad})
