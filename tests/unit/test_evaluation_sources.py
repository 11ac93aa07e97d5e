"""The prompt set of the generation gates is a source like the data: its claim is mounted in the pods, an
s3:// or hub prompt set is fetched into the cache by the fetch stage."""

from __future__ import annotations

from sft_operator.api.types import SFTJob
from sft_operator.core.render import RenderOptions, pvc_claims, render_children
from sft_contract.spec import TrainingSpec
from sft_contract.sources import remote_sources

from .helpers import manifest

GATES = {"gates": [{"metric": "exactMatch", "threshold": 0.5}]}


def test_a_prompt_set_on_another_claim_is_mounted_read_only_in_the_trainer_pods():
    doc = manifest(evaluation={**GATES, "prompts": {"source": "pvc://eval-sets/support/prompts.jsonl"}})
    assert pvc_claims(SFTJob.model_validate(doc)) == {"datasets": False, "eval-sets": False, "models": True}
    job = next(c for c in render_children(doc, RenderOptions()) if c["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert "eval-sets" in claims


def test_an_s3_prompt_set_is_fetched_with_the_data():
    spec = TrainingSpec.model_validate({
        "model": {"source": "s3://models/base"}, "dataset": {"train": {"source": "s3://data/train.jsonl"}},
        "evaluation": {**GATES, "prompts": {"source": "s3://data/eval/prompts.jsonl"}},
        "output": {"destination": "s3://models/out"}})
    fetched = {r.field: r.source for r in remote_sources(spec)}
    assert fetched["spec.evaluation.prompts.source"] == "s3://data/eval/prompts.jsonl"
