"""Generate the SFTJob CustomResourceDefinition from the pydantic models.

Pydantic emits JSON Schema 2020-12; the API server wants a *structural* OpenAPI v3 schema:
every `$ref` inlined, `nullable` instead of `anyOf [X, null]`, boolean `exclusiveMinimum`,
no `additionalProperties: false`, no `title`/`propertyNames`/`const`. No library does this
conversion for CRDs (kubebuilder's generator is Go-only), so it lives here, small and pure.
"""

from __future__ import annotations

from typing import Any

import yaml

from sft_operator.api import GROUP, KIND, PLURAL, SHORT_NAME, SINGULAR, VERSION
from sft_operator.api.types import DNS_1035_LABEL, MAX_NAME_LENGTH, SPEC_TRANSITION_CEL, SFTJob

CRD_FILE = f"{GROUP}_{PLURAL}.yaml"
# Bounds for strings the models leave open (formats such as date-time).
DEFAULT_MAX_LENGTH = 1024

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.percent", "description": "Percent done"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.metrics.trainLoss", "description": "Latest train loss"},
    {"name": "Evaluation", "type": "string", "jsonPath": '.status.conditions[?(@.type=="EvaluationPassed")].reason',
     "description": "The evaluation gates: GatesPassed, GatesFailed (Mark), EvaluationFailed, Measuring"},
    {"name": "Eval-Loss", "type": "number", "jsonPath": ".status.metrics.evalLoss", "priority": 1},
    {"name": "Reason", "type": "string", "jsonPath": ".status.reason", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

_DROPPED_KEYS = {"title", "propertyNames", "$defs", "discriminator"}


def to_structural(node: Any, defs: dict[str, Any]) -> Any:
    """Convert one pydantic JSON-schema node into a structural OpenAPI v3 node (recursively)."""
    if isinstance(node, list):
        return [to_structural(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return to_structural(merged, defs)
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        nullable = len(options) < len(node["anyOf"])
        if len(options) != 1:
            raise ValueError(f"unions other than Optional[X] are not structural: {node}")
        outer = {k: v for k, v in node.items() if k not in ("anyOf", "default")}
        inner = to_structural(options[0], defs)
        rules = inner.pop("x-kubernetes-validations", []) + outer.pop("x-kubernetes-validations", [])
        out = {**inner, **to_structural(outer, defs)}
        if rules:
            out["x-kubernetes-validations"] = rules
        if nullable:
            out["nullable"] = True
        if node.get("default") is not None:
            out["default"] = node["default"]
        return out

    if "patternProperties" in node:
        # A map with constrained keys: structural schemas only allow additionalProperties.
        ((pattern, values),) = node["patternProperties"].items()
        node = {k: v for k, v in node.items() if k != "patternProperties"}
        node["additionalProperties"] = values
        node["propertyNames"] = {"pattern": pattern}

    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED_KEYS:
            continue
        if key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "additionalProperties" and value is False:
            continue
        elif key == "properties":
            out[key] = {name: to_structural(sub, defs) for name, sub in value.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = to_structural(value, defs)
        else:
            out[key] = value
    if "enum" in out and "type" not in out:
        out["type"] = "string" if all(isinstance(v, str) for v in out["enum"]) else out.get("type")
    if out.get("type") == "object" and "additionalProperties" in out:
        # A map: bound the keys the way propertyNames did, with CEL.
        keys = node.get("propertyNames", {})
        if "pattern" in keys:
            out.setdefault("x-kubernetes-validations", []).append(
                {"rule": f"self.all(k, k.matches('{keys['pattern']}'))", "message": "invalid key"}
            )
    if out.get("type") == "string" and "maxLength" not in out:
        out["maxLength"] = max((len(v) for v in out.get("enum", [])), default=DEFAULT_MAX_LENGTH)
    if out.get("default") is None:
        out.pop("default", None)
    return out


def openapi_schema() -> dict[str, Any]:
    raw = SFTJob.model_json_schema(by_alias=True, mode="validation")
    defs = raw.get("$defs", {})
    schema = to_structural(raw, defs)
    props = schema["properties"]
    # The API server owns metadata, apiVersion and kind.
    props["metadata"] = {"type": "object"}
    props["apiVersion"] = {"type": "string", "maxLength": 64}
    props["kind"] = {"type": "string", "maxLength": 64}
    props["status"].pop("nullable", None)
    schema["required"] = ["spec"]
    schema["x-kubernetes-validations"] = [
        {
            "rule": f"self.metadata.name.size() <= {MAX_NAME_LENGTH} && self.metadata.name.matches('{DNS_1035_LABEL}')",
            # No fieldPath: the API server only accepts paths inside the schema, and metadata isn't.
            "message": f"metadata.name must be an RFC 1035 label of at most {MAX_NAME_LENGTH} characters",
        }
    ]
    spec = props["spec"]
    spec.setdefault("x-kubernetes-validations", []).extend(SPEC_TRANSITION_CEL)
    return schema


def crd_manifest() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "sft-operator", "app.kubernetes.io/part-of": "sft-operator"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": [SHORT_NAME],
                "categories": ["all", "sft"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = "# Generated by `sftctl crd` from sft_operator.api.types. Do not edit; regenerate.\n"
    return header + yaml.safe_dump(crd_manifest(), sort_keys=False, width=120)
