"""The CRD is generated from the models, structural, bounded, and checked in."""

import json
import subprocess
import sys

from sft_operator.api.crd import CRD_FILE, crd_manifest, crd_yaml

from .helpers import ROOT


def _schema():
    return crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _walk(node, path="", seen=None):
    seen = [] if seen is None else seen
    seen.append((path, node))
    for name, sub in node.get("properties", {}).items():
        _walk(sub, f"{path}.{name}", seen)
    if isinstance(node.get("items"), dict):
        _walk(node["items"], f"{path}[]", seen)
    if isinstance(node.get("additionalProperties"), dict):
        _walk(node["additionalProperties"], f"{path}{{}}", seen)
    return seen


def test_checked_in_crd_matches_the_generator():
    checked_in = (ROOT / "crds" / CRD_FILE).read_text()
    assert checked_in == crd_yaml(), "crds/ is stale: run `sftctl crd -o crds/sft.dev_sftjobs.yaml`"


def test_sftctl_crd_prints_the_same_crd():
    out = subprocess.run([sys.executable, "-m", "sft_operator.cli.sftctl", "crd"], capture_output=True, text=True, check=True)
    assert out.stdout == crd_yaml()


def test_schema_is_structural_and_bounded():
    text = json.dumps(_schema())
    assert "$ref" not in text and "anyOf" not in text and "propertyNames" not in text
    for path, node in _walk(_schema()):
        assert node.get("additionalProperties") is not False, path
        assert "type" in node, f"{path} has no type"
        if node["type"] == "string":
            assert "maxLength" in node, f"{path} string without maxLength"
        if node["type"] == "array":
            assert "maxItems" in node, f"{path} list without maxItems"


def test_optionals_are_nullable_and_required_fields_required():
    spec = _schema()["properties"]["spec"]
    assert set(spec["required"]) == {"model", "dataset", "output"}
    assert spec["properties"]["peft"]["nullable"] is True


def test_status_subresource_and_printer_columns():
    version = crd_manifest()["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    shown = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert shown == ["Phase", "Progress", "Loss", "Evaluation", "Age"]
    status = _schema()["properties"]["status"]["properties"]
    assert {"conditions", "phase", "progress", "metrics", "output", "restarts", "startTime", "completionTime",
            "evaluation"} <= set(status)


def test_training_spec_is_immutable_but_run_policy_is_not():
    rules = [r["rule"] for r in _schema()["properties"]["spec"]["x-kubernetes-validations"]]
    for field in ("model", "dataset", "hyperparameters", "output", "peft", "evaluation"):
        assert any(f"self.{field} == oldSelf.{field}" in r for r in rules), field
    assert not any("runPolicy" in r for r in rules)


def test_exclusive_bounds_use_openapi_v3_booleans():
    lr = _schema()["properties"]["spec"]["properties"]["hyperparameters"]["properties"]["learningRate"]
    assert lr["minimum"] == 0 and lr["exclusiveMinimum"] is True and lr["maximum"] == 1


def test_every_reference_field_carries_the_grammar_the_models_evaluate():
    # One rule list per grammar, in the CRD as CEL (the API server refuses) and in the models (sftctl validate):
    # the same regular expressions, so both refuse the same values.
    from sft_contract import references as ref

    spec = _schema()["properties"]["spec"]["properties"]
    fields = {
        "model.source": ref.SOURCE_RULES,
        "dataset.train.source": ref.SOURCE_RULES,
        "dataset.validation.source": ref.SOURCE_RULES,
        "dataset.general.source": ref.SOURCE_RULES,
        "output.destination": ref.SOURCE_RULES,
        "model.revision": ref.REVISION_RULES,
        "tracking.mlflow.trackingUri": ref.url_rules("tokenSecretRef"),
        "storage.s3.endpoint": ref.url_rules("credentialsSecretRef"),
        "image": ref.IMAGE_RULES,
    }
    for dotted, rules in fields.items():
        node = spec
        for i, name in enumerate(dotted.split(".")):
            node = (node if i == 0 else node["properties"])[name]
        assert node.get("x-kubernetes-validations") == [r.cel() for r in rules], dotted


def test_grammar_rules_read_the_same_in_cel_and_python():
    # CEL strings unescape once: the regex the API server compiles is the pattern the models use.
    from sft_contract import references as ref

    rule = ref.Rule(r"^[^\x00-\x1f]*$", "m", when="pvc://")
    assert rule.cel()["rule"] == "!self.startsWith('pvc://') || self.matches('^[^\\\\x00-\\\\x1f]*$')"
    assert not ref.Rule("^a$", "m").holds("a\n")  # RE2's $ is the end of the text; so is ours
