"""The SFTJob models: defaults follow the guide, bad input names its field."""

import pytest
from pydantic import ValidationError

from sft_operator.api import SFTJob
from sft_operator.validation import problems_in

from .helpers import EXAMPLES, INVALID, MINIMAL, broken_field, load, manifest


def test_defaults_follow_the_fine_tuning_guide():
    spec = SFTJob.model_validate(MINIMAL).spec
    hp = spec.hyperparameters
    assert (hp.learning_rate, hp.num_epochs, hp.warmup_ratio, hp.lr_scheduler) == (2e-5, 3, 0.1, "cosine")
    assert (hp.max_grad_norm, hp.precision) == (1.0, "auto")
    assert 0.01 <= hp.weight_decay <= 0.1
    assert spec.dataset.effective_validation_split == 0.1  # a validation set by default
    assert spec.dataset.prompt_template.startswith("### Instruction:")
    assert spec.checkpointing.resume is True
    assert spec.resources.gpu_resource_name == "nvidia.com/gpu"


def test_effective_batch_counts_every_gpu_on_every_node():
    doc = manifest(
        hyperparameters={"perDeviceBatchSize": 2, "gradientAccumulationSteps": 8},
        resources={"nodes": 2, "gpusPerNode": 4},
    )
    assert SFTJob.model_validate(doc).spec.effective_batch_size == 2 * 8 * 2 * 4


def test_cpu_job_counts_as_one_process_per_node():
    doc = manifest(hyperparameters={"perDeviceBatchSize": 2, "gradientAccumulationSteps": 8}, resources={"gpusPerNode": 0})
    assert SFTJob.model_validate(doc).spec.effective_batch_size == 16


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_is_valid(path):
    assert problems_in(load(path)) == []


def test_invalid_corpus_is_big_enough():
    assert len(INVALID) >= 30


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_manifest_is_rejected_naming_its_field(path):
    problems = problems_in(load(path))
    assert problems, f"{path.name} was accepted"
    field = broken_field(path)
    assert any(p.path == field or p.path.startswith(field + ".") for p in problems), [str(p) for p in problems]


def test_every_offending_field_is_reported_at_once():
    doc = manifest(hyperparameters={"learningRate": 0, "numEpochs": 0}, resources={"nodes": 0})
    paths = {p.path for p in problems_in(doc)}
    assert {"spec.hyperparameters.learningRate", "spec.hyperparameters.numEpochs", "spec.resources.nodes"} <= paths


def test_secret_values_are_never_accepted_inline():
    doc = manifest(model={"source": "org/model", "token": "hf_secret"})
    with pytest.raises(ValidationError) as err:
        SFTJob.model_validate(doc)
    assert "token" in str(err.value)
    assert "hf_secret" not in "".join(p.path for p in problems_in(doc))


def test_training_part_excludes_the_kubernetes_side():
    spec = SFTJob.model_validate(manifest(resources={"nodes": 2}, image="x/y:1")).spec
    dumped = spec.training_part().model_dump(by_alias=True)
    assert "resources" not in dumped and "image" not in dumped and "runPolicy" not in dumped
    assert dumped["model"]["source"] == "Qwen/Qwen2.5-0.5B"
