"""Training runs on the tiny model: learning, outputs, freezing, early stopping, packing, LoRA."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch")

from safetensors.torch import load_file  # noqa: E402

from sft_trainer import train  # noqa: E402
from sft_contract.spec import TrainingSpec  # noqa: E402

from trainer_helpers import read_log  # noqa: E402


def run(spec: dict) -> dict:
    return train.run(TrainingSpec.model_validate(spec), stdout=None)


def mean(xs):
    return sum(xs) / len(xs)


def test_response_loss_falls_and_outputs_are_written(make_spec, tmp_path):
    spec = make_spec(hyperparameters={"numEpochs": 2})
    metrics = run(spec)
    out = tmp_path / "out"
    losses = [r["loss"] for r in read_log(out) if "loss" in r]
    assert mean(losses[-20:]) < 0.7 * mean(losses[:10])
    evals = [r["evalLoss"] for r in read_log(out) if "evalLoss" in r]
    assert len(evals) == 2 and evals[-1] < losses[0]
    lrs = [r["learningRate"] for r in read_log(out) if "loss" in r]
    peak = lrs.index(max(lrs))
    assert max(lrs) == pytest.approx(3e-3) and 0 < peak <= 10  # warmup: 5% of 180 steps, then cosine decay
    assert lrs[0] < lrs[peak] and lrs[-1] < 0.01 * lrs[peak]
    assert (out / "loss.png").stat().st_size > 1000
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["steps"] == metrics["steps"] == 2 * 90  # 720 rows / batch 8, two epochs
    assert saved["effectiveBatchSize"] == 8 and saved["bestCheckpoint"].endswith("step-00000180")
    assert saved["data"]["trainRows"] == 720 and saved["data"]["train"]["truncated"] == 0

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "model")
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert tok.pad_token_id != tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id


def test_frozen_layers_and_embeddings_do_not_change(make_spec, tiny, tmp_path):
    # With gradient checkpointing and a dropout override on, which must not touch frozen weights either.
    run(make_spec(freezeLayers=2, freezeEmbeddings=True,
                  hyperparameters={"maxSteps": 10, "gradientCheckpointing": True, "dropout": 0.1}))
    before = load_file(tiny / "model" / "model.safetensors")
    after = load_file(tmp_path / "out" / "model" / "model.safetensors")
    for name, w in before.items():
        frozen = name.startswith(("model.layers.0.", "model.layers.1.", "model.embed_tokens"))
        assert torch.equal(w, after[name]) == frozen, name


def test_early_stopping_on_rising_validation_loss(make_spec, tiny, tmp_path):
    # Validation answers contradict the training answers: the better the model fits the training data,
    # the worse its validation loss gets.
    rows = [json.loads(line) for line in (tiny / "data" / "train.jsonl").read_text().splitlines()[:60]]
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({**r, "output": r["output"][::-1] + " banana kitten"}) + "\n" for r in rows))
    spec = make_spec(
        dataset={"validation": {"source": str(val)}, "validationSplit": None},
        hyperparameters={"numEpochs": 20, "learningRate": 1e-2},
        evaluation={"strategy": "steps", "steps": 10, "earlyStopping": {"patience": 2}},
        checkpointing={"keep": 1},
    )
    metrics = run(spec)
    evals = [(r["step"], r["evalLoss"]) for r in read_log(tmp_path / "out") if "evalLoss" in r]
    assert metrics["stoppedEarly"] and metrics["steps"] < 20 * 90
    best_step, best = min(evals, key=lambda e: e[1])
    assert metrics["bestEvalLoss"] == pytest.approx(best)
    assert metrics["bestCheckpoint"].endswith(f"step-{best_step:08d}")
    assert (tmp_path / "out" / "checkpoints" / f"step-{best_step:08d}" / "COMPLETE").exists()  # kept despite keep=1
    assert evals[-1][1] > best and metrics["outputUsesBestCheckpoint"]


def test_packing_trains(make_spec, tmp_path):
    metrics = run(make_spec(dataset={"packing": True}, hyperparameters={"maxSteps": 30}))
    losses = [r["loss"] for r in read_log(tmp_path / "out") if "loss" in r]
    assert metrics["packing"] and metrics["steps"] == 30 and mean(losses[-5:]) < mean(losses[:5])


@pytest.mark.parametrize("merge", [False, True])
def test_lora_adapters_save_and_optionally_merge(make_spec, tmp_path, merge):
    metrics = run(make_spec(peft={"rank": 4, "alpha": 8, "merge": merge}, hyperparameters={"maxSteps": 8}))
    model_dir = tmp_path / "out" / "model"
    assert metrics["trainableParameters"] < 100_000
    if merge:
        from transformers import AutoModelForCausalLM

        assert not (model_dir / "adapter_config.json").exists()
        AutoModelForCausalLM.from_pretrained(model_dir)
    else:
        assert (model_dir / "adapter_config.json").exists()


def test_sftctl_run_shows_progress_and_a_summary(make_spec, tmp_path):
    import io

    from rich.console import Console

    from sft_trainer import local

    spec = make_spec(hyperparameters={"maxSteps": 6}, resources={"gpusPerNode": 1})  # cluster fields are ignored
    manifest = {"apiVersion": "sft.dev/v1alpha1", "kind": "SFTJob", "metadata": {"name": "tiny-local"}, "spec": spec}
    buf = io.StringIO()
    code = local.run(manifest, output=str(tmp_path / "elsewhere"), console=Console(file=buf, width=160))
    text = buf.getvalue()
    assert code == 0, text
    assert "tiny-local" in text and "fine-tuning summary" in text and "6 / 6" in text
    assert (tmp_path / "elsewhere" / "model").is_dir() and not (tmp_path / "out").exists()
    bad = {**manifest, "spec": {**spec, "hyperparameters": {"learningRate": 0}}}
    assert local.run(bad, console=Console(file=io.StringIO())) == 64
