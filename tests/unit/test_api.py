"""The SFTJob models: defaults follow the guide, bad input names its field."""

import pytest
from pydantic import ValidationError

from sft_operator.api.types import SFTJob
from sft_operator.core.validation import problems_in

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


REFUSED_REFERENCES = [
    # (spec overrides, field path, what the message says)
    ({"model": {"source": "pvc://datasets/../../etc"}}, "spec.model.source", ". or .. segments"),
    ({"output": {"destination": "pvc://models/../../tmp/out"}}, "spec.output.destination", ". or .. segments"),
    ({"output": {"destination": "pvc://models/./out"}}, "spec.output.destination", ". or .. segments"),
    ({"dataset": {"train": {"source": "s3://datasets/a/../../b"}}}, "spec.dataset.train.source", ". or .. segments"),
    ({"dataset": {"train": {"source": "s3://datasets//train.jsonl"}}}, "spec.dataset.train.source", "empty"),
    ({"model": {"source": "gs://models/llama"}}, "spec.model.source", "only pvc:// and s3://"),
    ({"model": {"source": "org/../model"}}, "spec.model.source", "hub id is namespace/name"),
    ({"model": {"source": "Qwen/Qwen2.5-0.5B\nforged"}}, "spec.model.source", "control characters"),
    ({"model": {"source": "Qwen/Qwen2.5-0.5B", "revision": "../main"}}, "spec.model.revision", "branch, tag or commit"),
    ({"tracking": {"mlflow": {"trackingUri": "https://me:hunter2@mlflow.example.com"}}},
     "spec.tracking.mlflow.trackingUri", "tokenSecretRef"),
    ({"tracking": {"mlflow": {"trackingUri": "http://mlflow:5000/?token=hunter2"}}},
     "spec.tracking.mlflow.trackingUri", "no query"),
    ({"storage": {"s3": {"endpoint": "http://AKIA:hunter2@minio.minio:9000"}}}, "spec.storage.s3.endpoint",
     "credentialsSecretRef"),
    ({"image": "ghcr.io/sft-operator/Trainer:0.1.0"}, "spec.image", "image reference"),
    ({"image": "ghcr.io/sft-operator/trainer:0.1.0:latest"}, "spec.image", "image reference"),
    ({"image": "ghcr.io/sft-operator/trainer@sha256:abc"}, "spec.image", "image reference"),
]


@pytest.mark.parametrize("overrides,field,says", REFUSED_REFERENCES, ids=[r[1] + ":" + r[2] for r in REFUSED_REFERENCES])
def test_reference_fields_are_parsed_by_their_grammar(overrides, field, says):
    problems = [p for p in problems_in(manifest(**overrides)) if p.path == field]
    assert problems and says in problems[0].message, [str(p) for p in problems_in(manifest(**overrides))]


def test_a_refused_value_is_never_echoed_into_messages():
    # The operator writes str(ValidationError) into a condition and an Event when a stored spec stops validating.
    doc = manifest(tracking={"mlflow": {"trackingUri": "https://me:hunter2@mlflow.example.com"}})
    with pytest.raises(ValidationError) as err:
        SFTJob.model_validate(doc)
    assert "hunter2" not in str(err.value)
    assert "hunter2" not in " ".join(str(p) for p in problems_in(doc))


ACCEPTED_REFERENCES = [
    {"model": {"source": "meta-llama/Llama-3.2-1B", "revision": "refs/pr/1"}},
    {"model": {"source": "gpt2", "revision": "a" * 40}},
    {"model": {"source": "/models/in-the-image"}, "output": {"destination": "s3://models/fine-tuned/run-1/"}},
    {"model": {"source": "~/models/x"}, "dataset": {"train": {"source": "./data/../data/train.jsonl"}}},
    {"dataset": {"train": {"source": "s3://my.bucket-1/a/.hidden/train.jsonl"}}},
    {"dataset": {"train": {"source": "pvc://datasets"}}},
    {"tracking": {"mlflow": {"trackingUri": "https://mlflow.example.com:8443/mlflow"}}},
    {"storage": {"s3": {"endpoint": "http://10.0.0.7:9000"}}},
    {"image": "trainer"},
    {"image": "localhost:5000/sft/trainer_gpu:v1.2.3-rc.1"},
    {"image": "ghcr.io/sft-operator/trainer:0.1.0@sha256:" + "0123456789abcdef" * 4},
]


@pytest.mark.parametrize("overrides", ACCEPTED_REFERENCES, ids=lambda o: str(o)[:60])
def test_reference_fields_accept_what_their_grammar_allows(overrides):
    assert problems_in(manifest(**overrides)) == []
