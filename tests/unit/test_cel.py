"""Each cross-field rule is written once, as CEL in the CRD; sftctl validate and the trainer evaluate that CEL
offline (sft_contract.cel) the way the API server does."""

import pytest

from sft_contract import cel
from sft_contract.spec import TrainingSpec
from sft_operator.api.crd import crd_manifest
from sft_operator.api.types import SFTJob
from sft_operator.core.validation import problems_in
from sft_trainer.__main__ import parse_spec
from sft_trainer.errors import ConfigError

from .helpers import manifest


def rules_in(node) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        found |= {r["rule"] for r in node.get("x-kubernetes-validations", [])}
        for value in node.values():
            found |= rules_in(value)
    elif isinstance(node, list):
        for value in node:
            found |= rules_in(value)
    return found


def test_every_rule_the_api_server_evaluates_on_create_is_evaluated_offline():
    in_crd = {r for r in rules_in(crd_manifest()) if "oldSelf" not in r}
    offline = rules_in(cel.schema_of(SFTJob))
    # The two rules only the CRD has restate patterns pydantic checks: metadata.name and a map's keys.
    assert {r.split("(")[0] for r in in_crd - offline} == {"self.metadata.name.size", "self.all"}
    assert offline - in_crd == set()


def test_transition_rules_apply_to_updates_only():
    assert any("oldSelf" in r for r in rules_in(crd_manifest()))
    assert all("oldSelf" not in rule["rule"] for _, _, rule in cel.rule_sites(SFTJob, manifest()))


@pytest.mark.parametrize("overrides,field,message", [
    ({"evaluation": {"strategy": "steps"}}, "spec.evaluation.steps", "steps is required when strategy is steps"),
    ({"checkpointing": {"strategy": "steps"}}, "spec.checkpointing.steps", "steps is required when strategy is steps"),
    ({"distributed": {"strategy": "ddp", "cpuOffload": True}}, "spec.distributed.cpuOffload",
     "cpuOffload needs strategy fsdp or auto"),
    ({"storage": {"cache": {"claimName": "c", "size": "1Gi"}}}, "spec.storage.cache.size", "set claimName or size, not both"),
    ({"dataset": {"train": {"source": "/d"}, "promptTemplate": "{input}"}}, "spec.dataset.promptTemplate",
     "must contain {instruction}"),
    ({"evaluation": {"gates": [{"metric": "evalLoss"}]}}, "spec.evaluation.gates.0.threshold",
     "a gate needs threshold or minChange (or both)"),
    ({"scheduling": {"tolerations": [{"operator": "Equal"}]}}, "spec.scheduling.tolerations.0.operator",
     "a toleration without a key must use operator Exists"),
])
def test_a_broken_rule_is_reported_at_its_field_with_the_crds_message(overrides, field, message):
    assert [(p.path, p.message) for p in problems_in(manifest(**overrides))] == [(field, message)]


def test_defaults_are_applied_before_the_rules():
    # heldOutRows defaults to 200, so a forgetting gate is fine without it; 0 is refused.
    gate = {"gates": [{"metric": "forgettingDelta", "threshold": 0.1}]}
    general = {"source": "org/general"}
    ok = manifest(dataset={"train": {"source": "/d"}, "general": general}, evaluation=gate)
    assert problems_in(ok) == []
    none_held_out = manifest(dataset={"train": {"source": "/d"}, "general": {**general, "heldOutRows": 0}}, evaluation=gate)
    assert [p.path for p in problems_in(none_held_out)] == ["spec.evaluation.gates"]


def test_rules_of_an_absent_object_are_not_evaluated_and_an_integer_is_a_number():
    # No evaluation object: its own rules do not run; the spec's rule reads validationSplit 0 (an int) as 0.0.
    doc = manifest(dataset={"train": {"source": "/d"}, "validationSplit": 0})
    assert [(p.path, p.message) for p in problems_in(doc)] == [
        ("spec.evaluation.strategy", "evaluation.strategy needs validation data; set it to no or add validation data")]
    assert problems_in(manifest(dataset={"train": {"source": "/d"}, "validationSplit": 0}, evaluation={"strategy": "no"})) == []


def test_a_repeated_key_of_a_map_list_is_refused():
    gates = [{"metric": "evalLoss", "threshold": 1.0}, {"metric": "evalLoss", "minChange": 0.0}]
    assert [p.path for p in problems_in(manifest(evaluation={"gates": gates}))] == ["spec.evaluation.gates.1"]


def test_a_field_with_a_schema_problem_gets_no_second_line_from_its_rule():
    doc = manifest(model={"source": "gs://models/x"})  # the grammar is both a pattern check and CEL
    assert [p.path for p in problems_in(doc)] == ["spec.model.source"]
    typed_wrong = manifest(dataset={"train": {"source": "/d"}, "validationSplit": "a lot"})
    assert [p.path for p in problems_in(typed_wrong)] == ["spec.dataset.validationSplit"]


def test_the_trainer_refuses_what_the_api_server_refuses_naming_the_field():
    spec = {"model": {"source": "org/m"}, "dataset": {"train": {"source": "/d/t.jsonl"}},
            "output": {"destination": "/tmp/out"}, "evaluation": {"strategy": "steps"}}
    with pytest.raises(ConfigError) as err:
        parse_spec(spec, "config.json")
    assert err.value.reason == ("config.json: invalid training spec: evaluation.steps: steps is required when "
                                "strategy is steps")
    spec["evaluation"]["steps"] = 10
    assert isinstance(parse_spec(spec), TrainingSpec)
