"""The evaluation gate in the trainer: base metrics at the start, tuned at the end, the verdict's consequences
(exit 80 and rejected/ for Fail, success with the verdict for Mark), and the same numbers under DDP and FSDP."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch")

from sft_trainer import tiny as tiny_assets  # noqa: E402

from trainer_helpers import free_port, run_module, trainer_env, write_config  # noqa: E402


@pytest.fixture
def prompts(tmp_path) -> Path:
    """Held-out prompts of the tiny tasks, as chat prompts (the model trains on the chat rows)."""
    rng = random.Random(7)
    path = tmp_path / "prompts.jsonl"
    with path.open("w") as f:
        for _ in range(12):
            row = tiny_assets.task_row(rng)
            user = row["instruction"] + (f"\n{row['input']}" if row.get("input") else "")
            f.write(json.dumps({"prompt": user, "expected": row["output"]}) + "\n")
    return path


@pytest.fixture
def gate_spec(make_spec, tiny, prompts):
    def build(gates: list[dict], **extra) -> dict:
        spec = make_spec(
            dataset={"train": {"source": str(tiny / "data" / "chat.jsonl")},
                     "general": {"source": str(tiny / "data" / "general.jsonl"), "heldOutRows": 40}},
            hyperparameters={"maxSteps": 30},
            evaluation={"gates": gates, "prompts": {"source": str(prompts), "maxNewTokens": 12}},
        )
        for key, value in extra.items():
            spec[key] = {**spec.get(key, {}), **value}
        return spec

    return build


def run_trainer(spec: dict, tmp_path: Path):
    cfg = write_config(spec, tmp_path / "config.json")
    log = tmp_path / "termination-log"
    result = run_module("sft_trainer", "--config", str(cfg), env=trainer_env(SFT_TERMINATION_LOG=str(log)))
    return result, (log.read_text() if log.exists() else "")


def by_metric(evaluation: dict) -> dict[str, dict]:
    return {g["metric"]: g for g in evaluation["gates"]}


def test_gates_that_pass_keep_the_model_in_model_and_report_base_and_tuned(gate_spec, tmp_path):
    spec = gate_spec([
        {"metric": "evalLoss", "minChange": 0.5},  # the random base model is far worse
        {"metric": "tokenAccuracy", "minChange": 0.05},
        {"metric": "forgettingDelta", "threshold": 1.0},  # general rows mixed in: no worse than before
        {"metric": "contains", "threshold": 0.0},
    ])
    result, message = run_trainer(spec, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    assert (out / "model" / "model.safetensors").exists() and not (out / "rejected").exists()
    evaluation = json.loads((out / "metrics.json").read_text())["evaluation"]
    assert evaluation["passed"] is True
    gates = by_metric(evaluation)
    assert gates["evalLoss"]["base"] - gates["evalLoss"]["tuned"] >= 0.5
    assert gates["tokenAccuracy"]["tuned"] > gates["tokenAccuracy"]["base"]
    assert gates["forgettingDelta"]["base"] == 0.0
    assert 0.0 <= gates["contains"]["base"] <= 1.0 and 0.0 <= gates["contains"]["tuned"] <= 1.0
    assert {g["direction"] for g in evaluation["gates"]} == {"lower", "higher"}
    # The operator reads the verdict from the termination message.
    assert json.loads(message)["evaluation"] == evaluation
    assert "evaluation gate evalLoss (lower is better)" in result.stderr


def test_a_failed_fail_gate_exits_80_naming_the_gate_and_keeps_the_model_under_rejected(gate_spec, tmp_path):
    spec = gate_spec([{"metric": "evalLoss", "minChange": 0.5}, {"metric": "exactMatch", "threshold": 1.0}])
    result, message = run_trainer(spec, tmp_path)
    assert result.returncode == 80, result.stderr[-3000:]
    out = tmp_path / "out"
    assert (out / "rejected" / "model" / "model.safetensors").exists() and not (out / "model").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["outputModel"] == f"{out}/rejected/model" and metrics["evaluation"]["passed"] is False
    exact = by_metric(metrics["evaluation"])["exactMatch"]
    # The reason names the failing gate with its numbers, and only that gate.
    assert message.startswith("evaluation gate failed: gate exactMatch: tuned ")
    assert f"< threshold 1; the model is kept in {out}/rejected/model" in message
    assert "gate evalLoss" not in message and exact["passed"] is False


def test_a_failed_mark_gate_succeeds_with_the_verdict_false(gate_spec, tmp_path):
    spec = gate_spec([{"metric": "evalLoss", "minChange": 0.5},
                      {"metric": "exactMatch", "threshold": 1.0, "onFail": "Mark"}])
    result, message = run_trainer(spec, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "model" / "model.safetensors").exists()
    evaluation = json.loads(message)["evaluation"]
    assert evaluation["passed"] is False
    assert by_metric(evaluation)["exactMatch"]["message"].startswith("tuned ")
    assert by_metric(evaluation)["evalLoss"]["passed"] is True


def test_a_bad_prompt_row_is_a_data_error_naming_file_and_row(gate_spec, tmp_path):
    bad = tmp_path / "bad-prompts.jsonl"
    bad.write_text('{"prompt": "What is 1 plus 1?", "expected": "2"}\n{"prompt": "Spell cat in capitals."}\n')
    spec = gate_spec([{"metric": "contains", "threshold": 0.5}])
    spec["evaluation"]["prompts"]["source"] = str(bad)
    result, message = run_trainer(spec, tmp_path)
    assert result.returncode == 65
    assert f"{bad} row 2: 'expected' missing or empty" in message


def test_base_metrics_are_the_same_in_one_process_under_ddp_and_fsdp(gate_spec, tmp_path):
    gates = [{"metric": "evalLoss", "threshold": 100.0}, {"metric": "tokenAccuracy", "threshold": 0.0},
             {"metric": "exactMatch", "threshold": 0.0}, {"metric": "contains", "threshold": 0.0}]
    results = {}
    for how in ("single", "ddp", "fsdp"):
        spec = gate_spec(gates, hyperparameters={"maxSteps": 2, "perDeviceBatchSize": 4},
                         output={"destination": str(tmp_path / how)})
        if how != "single":
            spec["distributed"] = {"strategy": how}
        cfg = write_config(spec, tmp_path / f"{how}.json")
        args = ("sft_trainer", "--config", str(cfg)) if how == "single" else (
            "sft_trainer.launch", "--nproc-per-node", "2", "--master-port", str(free_port()), "--config", str(cfg))
        result = run_module(*args, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
        results[how] = by_metric(json.loads((tmp_path / how / "metrics.json").read_text())["evaluation"])
    for how in ("ddp", "fsdp"):
        for metric in ("evalLoss", "tokenAccuracy", "exactMatch", "contains"):
            # Every rank's share summed: the whole set counted once (gloo sums in another order: float noise).
            assert results[how][metric]["base"] == pytest.approx(results["single"][metric]["base"], rel=1e-4), (how, metric)


def test_sftctl_run_prints_the_gate_table_and_exits_80_on_a_failed_gate(gate_spec, tmp_path):
    import io

    from rich.console import Console

    from sft_trainer import local

    spec = gate_spec([{"metric": "evalLoss", "minChange": 0.5}, {"metric": "exactMatch", "threshold": 1.0}],
                     hyperparameters={"maxSteps": 10})
    manifest = {"apiVersion": "sft.dev/v1alpha1", "kind": "SFTJob", "metadata": {"name": "gated"}, "spec": spec}
    buf = io.StringIO()
    code = local.run(manifest, console=Console(file=buf, width=240))
    text = buf.getvalue()
    assert code == 80, text
    assert "evaluation gates: FAILED" in text
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") > 5}
    assert "passed" in rows["evalLoss"] and "lower" in rows["evalLoss"]
    assert "failed: tuned" in rows["exactMatch"] and "Fail" in rows["exactMatch"]
    assert "EVALUATION_FAILED (exit 80): evaluation gate failed: gate exactMatch" in " ".join(text.split())


def test_a_resumed_run_judges_against_the_baseline_measured_at_its_start(gate_spec, tmp_path):
    from sft_trainer import train
    from sft_contract.spec import TrainingSpec

    from trainer_helpers import run_interrupted_at

    spec = gate_spec([{"metric": "evalLoss", "minChange": 0.5}, {"metric": "contains", "threshold": 0.0}],
                     hyperparameters={"maxSteps": 12}, checkpointing={"strategy": "steps", "steps": 4})
    fresh = gate_spec([{"metric": "evalLoss", "minChange": 0.5}, {"metric": "contains", "threshold": 0.0}],
                      hyperparameters={"maxSteps": 12}, output={"destination": str(tmp_path / "fresh")})
    base = by_metric(train.run(TrainingSpec.model_validate(fresh), stdout=None)["evaluation"])
    run_interrupted_at(spec, 6)  # a checkpoint at step 4 holds the base model's numbers
    resumed = by_metric(train.run(TrainingSpec.model_validate(spec), stdout=None)["evaluation"])
    # Not the half-trained model's loss at step 4: the base model's, as in an uninterrupted run.
    assert resumed["evalLoss"]["base"] == pytest.approx(base["evalLoss"]["base"], rel=1e-6)
    assert resumed["evalLoss"]["base"] - resumed["evalLoss"]["tuned"] >= 0.5
