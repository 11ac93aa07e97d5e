"""Advice turns the fine-tuning guide into warnings on a valid spec."""

from sft_operator.core.advice import advise, billions_of_parameters
from sft_operator.api.types import SFTJob

from .helpers import ROOT, load, manifest


def reasons(doc, **kw):
    return {a.reason for a in advise(SFTJob.model_validate(doc).spec, **kw)}


def test_model_size_is_read_from_the_name():
    assert billions_of_parameters("meta-llama/Llama-2-7b-hf") == 7
    assert billions_of_parameters("Qwen/Qwen2.5-0.5B") == 0.5
    assert billions_of_parameters("my-org/tiny-llama") is None


def test_learning_rate_far_outside_the_7b_range_is_flagged():
    assert "LearningRateOutOfRange" in reasons(manifest(model={"source": "meta-llama/Llama-2-7b-hf"}, hyperparameters={"learningRate": 1e-3}))
    assert "LearningRateOutOfRange" not in reasons(manifest(model={"source": "meta-llama/Llama-2-7b-hf"}, hyperparameters={"learningRate": 2e-5}))


def test_lora_tolerates_a_higher_learning_rate():
    doc = manifest(model={"source": "meta-llama/Llama-2-7b-hf"}, hyperparameters={"learningRate": 2e-4}, peft={"rank": 8})
    assert "LearningRateOutOfRange" not in reasons(doc)


def test_many_epochs_without_early_stopping():
    assert "ManyEpochsNoEarlyStopping" in reasons(manifest(hyperparameters={"numEpochs": 8}))
    doc = manifest(hyperparameters={"numEpochs": 8}, evaluation={"earlyStopping": {"patience": 2}})
    assert "ManyEpochsNoEarlyStopping" not in reasons(doc)


def test_fp16_where_bf16_is_available():
    doc = manifest(hyperparameters={"precision": "fp16"})
    assert "PreferBF16" in reasons(doc)
    assert "PreferBF16" not in reasons(doc, bf16_available=False)


def test_no_validation_data():
    doc = manifest(dataset={"train": {"source": "/d.jsonl"}, "validationSplit": 0}, evaluation={"strategy": "no"})
    assert "NoValidation" in reasons(doc)


def test_forgetting_unguarded_without_mix_or_freezing():
    assert "ForgettingUnguarded" in reasons(manifest())
    assert "ForgettingUnguarded" not in reasons(manifest(freezeLayers=4))
    assert "ForgettingUnguarded" not in reasons(load(ROOT / "examples" / "general-mix-frozen.yaml"))


def test_the_guide_recipe_gets_no_warnings():
    assert reasons(load(ROOT / "examples" / "llama2-7b-recipe.yaml")) == set()
