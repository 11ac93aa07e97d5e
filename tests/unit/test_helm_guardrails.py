"""The chart's guardrails and platform defaults as rendered: the admission policy's parameters come from
the values, per-namespace GPU quotas become ResourceQuotas, and trainer.defaults reach the operator in the
form it reads. What the API server does with the policy is tested on the real one
(tests/integration/test_guardrails.py)."""

from __future__ import annotations

import pytest

from sft_operator.api.types import PlatformDefaults

from .test_helm_chart import CHART, FULLNAME, NAMESPACE, helm, objects, one

GUARDED = {
    "allowedImagePrefixes": ["registry.corp.example/ml", "ghcr.io/acme/"],
    "allowedServiceAccounts": ["default", "trainer"],
    "allowedEndpointHosts": ["mlflow.mlflow", ".corp.example"],
    "maxNodes": 4,
    "maxGpusPerJob": 16,
    "requiredLabels": ["cost-center", "team"],
    "gpusPerNamespace": {"team-a": 16, "team-b": 8},
}


def test_guardrails_ship_by_default_and_restrict_nothing():
    docs = objects()
    policy = one(docs, "ValidatingAdmissionPolicy", f"{FULLNAME}-guardrails")
    binding = one(docs, "ValidatingAdmissionPolicyBinding", f"{FULLNAME}-guardrails")
    params = one(docs, "ConfigMap", f"{FULLNAME}-guardrails")
    assert policy["spec"]["matchConstraints"]["resourceRules"][0]["resources"] == ["sftjobs"]  # not sftjobs/status
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert binding["spec"]["paramRef"] == {"name": params["metadata"]["name"], "namespace": NAMESPACE,
                                           "parameterNotFoundAction": "Allow"}
    assert "matchResources" not in binding["spec"]  # every namespace
    assert params["data"] == {"allowedImagePrefixes": "", "allowedServiceAccounts": "", "allowedEndpointHosts": "",
                              "maxNodes": "0", "maxGpusPerJob": "0", "requiredLabels": ""}
    assert not [d for d in docs if d["kind"] == "ResourceQuota"]


def test_every_message_names_its_rule_by_its_value():
    policy = one(objects(), "ValidatingAdmissionPolicy")
    messages = [v["messageExpression"] for v in policy["spec"]["validations"]]
    named = {m.split(":", 1)[0].strip("'") for m in messages}
    assert named == {f"guardrails.{k}" for k in ("allowedImagePrefixes", "allowedServiceAccounts",
                                                 "allowedEndpointHosts", "maxNodes", "maxGpusPerJob",
                                                 "requiredLabels")}


def test_values_become_the_policy_parameters_and_namespace_quotas():
    docs = objects({"guardrails": {**GUARDED, "namespaceSelector": {"matchLabels": {"sft.dev/guardrails": "on"}},
                                   "validationActions": ["Warn", "Audit"]}})
    params = one(docs, "ConfigMap", f"{FULLNAME}-guardrails")["data"]
    assert params == {"allowedImagePrefixes": "registry.corp.example/ml,ghcr.io/acme/",
                      "allowedServiceAccounts": "default,trainer",
                      "allowedEndpointHosts": "mlflow.mlflow,.corp.example",
                      "maxNodes": "4", "maxGpusPerJob": "16", "requiredLabels": "cost-center,team"}
    binding = one(docs, "ValidatingAdmissionPolicyBinding")["spec"]
    assert binding["validationActions"] == ["Warn", "Audit"]
    assert binding["matchResources"] == {"namespaceSelector": {"matchLabels": {"sft.dev/guardrails": "on"}}}
    quotas = {d["metadata"]["namespace"]: d["spec"]["hard"] for d in docs if d["kind"] == "ResourceQuota"}
    assert quotas == {"team-a": {"requests.nvidia.com/gpu": "16"}, "team-b": {"requests.nvidia.com/gpu": "8"}}


def test_guardrails_can_be_left_out():
    kinds = {d["kind"] for d in objects({"guardrails": {**GUARDED, "enabled": False}})}
    assert not kinds & {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding", "ResourceQuota"}


@pytest.mark.parametrize("values, message", [
    ({"guardrails": {"allowedImagePrefixes": ["a,b"]}}, "allowedImagePrefixes"),
    ({"guardrails": {"maxNodes": -1}}, "maxNodes"),
    ({"guardrails": {"maxGpusPerJob": "8"}}, "maxGpusPerJob"),
    ({"guardrails": {"validationActions": ["Reject"]}}, "validationActions"),
    ({"guardrails": {"gpusPerNamespace": {"team-a": "all"}}}, "gpusPerNamespace"),
    ({"guardrails": {"requiredLabel": ["team"]}}, "requiredLabel"),
    ({"trainer": {"defaults": {"cache": {"size": "lots"}}}}, "size"),
    ({"trainer": {"defaults": {"tolerations": [{"key": "gpu", "operator": "Maybe"}]}}}, "operator"),
    ({"trainer": {"defaults": {"nodeselector": {}}}}, "nodeselector"),
])
def test_values_schema_rejects_bad_guardrails_and_defaults(values, message):
    proc = helm("template", "sft", str(CHART), values=values, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def operator_env(values=None) -> dict[str, str]:
    container = one(objects(values), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in container["env"]}


def test_trainer_defaults_reach_the_operator_as_it_reads_them():
    assert operator_env()["SFT_TRAINER_DEFAULTS"] == "{}"  # nothing set: nothing applied
    defaults = {"nodeSelector": {"pool": "a100"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                                {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoExecute",
                                 "tolerationSeconds": 300}],
                "priorityClassName": "ml-batch", "cache": {"storageClassName": "fast-rwx", "size": "200Gi"}}
    env = operator_env({"trainer": {"defaults": defaults}})
    parsed = PlatformDefaults.model_validate_json(env["SFT_TRAINER_DEFAULTS"])
    assert parsed.model_dump(mode="json", by_alias=True, exclude_none=True) == defaults
    # Only the cache's size: its empty StorageClass is left out, not sent as "".
    env = operator_env({"trainer": {"defaults": {"cache": {"size": "80Gi"}}}})
    assert env["SFT_TRAINER_DEFAULTS"] == '{"cache":{"size":"80Gi"}}'
