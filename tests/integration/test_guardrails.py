"""The chart's guardrails on the real API server, and its platform defaults in the Job the operator creates.

One `helm install` for the module: its ValidatingAdmissionPolicy is bound only to this module's team
namespace (guardrails.namespaceSelector), so no other test's SFTJobs are checked while it is installed.
Every guardrail refuses a violating SFTJob at `kubectl apply` with a message that names the rule; a
compliant one is created. Then the operator, run with the environment the chart gives its pod, renders
a job that leaves scheduling and cache out with the platform's defaults, and says so in its status.
"""

from __future__ import annotations

import copy
import json
import uuid
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from sft_operator.api import GROUP, PLURAL, VERSION

from .test_helm_install import RESTRICTED, Operator, Release, delete_namespace, make_namespace

pytestmark = pytest.mark.cluster

TRAINER_IMAGE = "registry.corp.example/ml/trainer:1.2"
DEFAULTS = {
    "nodeSelector": {"pool": "a100"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "priorityClassName": "ml-batch",
    "cache": {"storageClassName": "fast-rwx", "size": "200Gi"},
}
NAMESPACE_GPUS = 8


def guardrails(selector: dict[str, str], team: str) -> dict[str, Any]:
    return {
        "allowedImagePrefixes": ["registry.corp.example/ml", "ghcr.io/acme/"],
        "allowedServiceAccounts": ["trainer"],
        "allowedEndpointHosts": ["mlflow.mlflow", ".corp.example"],
        "maxNodes": 4,
        "maxGpusPerJob": 16,
        "requiredLabels": ["cost-center", "team"],
        "gpusPerNamespace": {team: NAMESPACE_GPUS},
        "namespaceSelector": {"matchLabels": selector},
    }


def compliant(name: str) -> dict[str, Any]:
    """Within every guardrail, each at its edge where it has one."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "SFTJob",
        "metadata": {"name": name, "labels": {"cost-center": "ml-42", "team": "search"}},
        "spec": {
            "model": {"source": "Qwen/Qwen2.5-0.5B"},
            "dataset": {"train": {"source": "pvc://datasets/train.jsonl"}},
            "output": {"destination": "pvc://models/guarded"},
            "image": "registry.corp.example/ml/trainer:1.2",
            "serviceAccountName": "trainer",
            "resources": {"nodes": 4, "gpusPerNode": 4},
            "tracking": {"mlflow": {"trackingUri": "http://mlflow.mlflow:5000", "experiment": "guarded"}},
            "storage": {"s3": {"endpoint": "https://minio.data.corp.example"}},
            "runPolicy": {"suspend": True},
        },
    }


def _set(doc: dict, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = doc
    for key in parents:
        node = node.setdefault(key, {})
    if value is None:
        node.pop(last, None)
    else:
        node[last] = value


# (what breaks the rule, the rule the message must name, what else the message must say)
VIOLATIONS = {
    "image-elsewhere": ({"spec.image": "docker.io/someone/miner:latest"}, "guardrails.allowedImagePrefixes",
                        "docker.io/someone/miner:latest"),
    "image-sibling-repository": ({"spec.image": "registry.corp.example/ml-evil/trainer:1"},
                                 "guardrails.allowedImagePrefixes", "ml-evil"),
    "service-account": ({"spec.serviceAccountName": "cloud-admin"}, "guardrails.allowedServiceAccounts",
                        "cloud-admin"),
    "service-account-default": ({"spec.serviceAccountName": None}, "guardrails.allowedServiceAccounts", "default"),
    "tracking-host": ({"spec.tracking.mlflow.trackingUri": "https://collector.attacker.example/mlflow"},
                      "guardrails.allowedEndpointHosts", "collector.attacker.example"),
    "s3-host": ({"spec.storage.s3.endpoint": "https://corp.example.attacker.example"},
                "guardrails.allowedEndpointHosts", "spec.storage.s3.endpoint"),
    "nodes": ({"spec.resources": {"nodes": 5, "gpusPerNode": 1}}, "guardrails.maxNodes", "limit of 4"),
    "gpus-per-job": ({"spec.resources": {"nodes": 4, "gpusPerNode": 8}}, "guardrails.maxGpusPerJob", "32 GPUs"),
    "labels": ({"metadata.labels": {"team": "search"}}, "guardrails.requiredLabels", "cost-center"),
    "label-empty": ({"metadata.labels": {"team": "search", "cost-center": ""}}, "guardrails.requiredLabels",
                    "cost-center"),
}


class Guarded:
    def __init__(self, control_plane, release: Release, team: str) -> None:
        self.cp, self.release, self.team = control_plane, release, team
        self.custom = client.CustomObjectsApi(control_plane.api)

    def apply(self, doc: dict[str, Any], namespace: str | None = None, dry_run: bool = False):
        args = ["apply", "-n", namespace or self.team, "-f", "-"] + (["--dry-run=server"] if dry_run else [])
        return self.cp.kubectl(*args, check=False, input=json.dumps(doc))


@pytest.fixture(scope="module")
def guarded(control_plane):
    tag = uuid.uuid4().hex[:6]
    selector = {"sft.dev/guardrails": tag}
    home = make_namespace(control_plane, "sft-guard", RESTRICTED)
    team = make_namespace(control_plane, "team", selector)
    values = {"watchNamespaces": [team], "guardrails": guardrails(selector, team),
              "trainer": {"image": TRAINER_IMAGE, "defaults": DEFAULTS}}
    release = Release(control_plane, home, values)
    try:
        release.install()
        env = Guarded(control_plane, release, team)
        # The API server loads a new policy and binding within a moment: wait until it refuses.
        too_big = compliant(f"probe-{tag}")
        _set(too_big, "spec.resources", {"nodes": 5, "gpusPerNode": 1})
        control_plane.wait_for(lambda: env.apply(too_big, dry_run=True).returncode != 0, 30,
                               "the admission policy to be in force")
        yield env
    finally:
        release.uninstall()
        delete_namespace(control_plane, team)
        delete_namespace(control_plane, home)


@pytest.mark.parametrize("case", VIOLATIONS, ids=list(VIOLATIONS))
def test_each_guardrail_refuses_a_violating_sftjob_naming_the_rule(guarded, case):
    changes, rule, detail = VIOLATIONS[case]
    doc = compliant(f"bad-{case}")
    for path, value in changes.items():
        _set(doc, path, value)
    proc = guarded.apply(doc)
    assert proc.returncode != 0, f"{case}: admitted:\n{proc.stdout}"
    assert "denied request" in proc.stderr and rule in proc.stderr and detail in proc.stderr, proc.stderr
    with pytest.raises(ApiException) as gone:
        guarded.custom.get_namespaced_custom_object(GROUP, VERSION, guarded.team, PLURAL, doc["metadata"]["name"])
    assert gone.value.status == 404


def test_a_compliant_sftjob_is_admitted_and_its_labels_stay(guarded):
    doc = compliant("compliant")
    proc = guarded.apply(doc)
    assert proc.returncode == 0, proc.stderr
    created = guarded.custom.get_namespaced_custom_object(GROUP, VERSION, guarded.team, PLURAL, "compliant")
    assert created["spec"]["image"] == doc["spec"]["image"]
    # Updates are checked too: the cost labels cannot be taken off later...
    proc = guarded.cp.kubectl("label", "-n", guarded.team, "sftjob/compliant", "cost-center-", check=False)
    assert proc.returncode != 0 and "guardrails.requiredLabels" in proc.stderr, proc.stderr
    # ...while what may change after creation still does.
    proc = guarded.cp.kubectl("patch", "-n", guarded.team, "sftjob/compliant", "--type=merge",
                              "-p", '{"spec": {"runPolicy": {"backoffLimit": 1}}}', check=False)
    assert proc.returncode == 0, proc.stderr


def test_other_namespaces_are_not_checked_and_jobs_from_before_a_rule_stay_editable(guarded, namespace):
    doc = compliant("elsewhere")
    _set(doc, "spec.image", "docker.io/someone/miner:latest")
    _set(doc, "metadata.labels", None)
    proc = guarded.apply(doc, namespace=namespace)
    assert proc.returncode == 0, proc.stderr
    # The namespace comes under the guardrails: new jobs like it are refused...
    selector = guarded.release.values["guardrails"]["namespaceSelector"]["matchLabels"]
    client.CoreV1Api(guarded.cp.api).patch_namespace(namespace, {"metadata": {"labels": selector}})
    again = {**doc, "metadata": {"name": "elsewhere-again"}}
    guarded.cp.wait_for(lambda: guarded.apply(again, namespace=namespace, dry_run=True).returncode != 0, 30,
                        "the policy to cover the relabelled namespace")
    # ...while the job admitted before can still be suspended, its missing labels and image notwithstanding.
    proc = guarded.cp.kubectl("patch", "-n", namespace, "sftjob/elsewhere", "--type=merge",
                              "-p", '{"spec": {"runPolicy": {"suspend": false}}}', check=False)
    assert proc.returncode == 0, proc.stderr


def test_gpus_per_namespace_are_a_quota_the_api_server_enforces(guarded):
    core = client.CoreV1Api(guarded.cp.api)
    (quota,) = core.list_namespaced_resource_quota(guarded.team).items
    assert quota.spec.hard == {"requests.nvidia.com/gpu": str(NAMESPACE_GPUS)}
    pod = {"metadata": {"name": "too-many-gpus"}, "spec": {"containers": [{
        "name": "c", "image": TRAINER_IMAGE,
        "resources": {"limits": {"nvidia.com/gpu": str(NAMESPACE_GPUS + 1)}}}]}}

    def refused() -> ApiException | None:
        try:
            core.create_namespaced_pod(guarded.team, pod, dry_run="All")
        except ApiException as exc:
            return exc
        return None  # the API server's quota admission has not seen the new quota yet (its informer lags)

    error = guarded.cp.wait_for(refused, 30, "the GPU quota enforced at admission")
    assert error.status == 403 and "exceeded quota" in error.body


def test_platform_defaults_fill_what_the_job_leaves_out_and_status_says_so(guarded, tmp_path):
    core, batch = client.CoreV1Api(guarded.cp.api), client.BatchV1Api(guarded.cp.api)
    doc = compliant("defaulted")
    for path in ("spec.image", "spec.tracking", "spec.storage"):
        _set(doc, path, None)
    _set(doc, "spec.resources", {"nodes": 1, "gpusPerNode": 1})
    operator = Operator(guarded.release, tmp_path)
    try:
        operator.start()
        proc = guarded.apply(doc)
        assert proc.returncode == 0, proc.stderr
        job = guarded.cp.wait_for(lambda: batch.read_namespaced_job("defaulted", guarded.team), 30, "the trainer Job")
        pod = job.spec.template.spec
        assert pod.node_selector == DEFAULTS["nodeSelector"]
        assert [(t.key, t.operator, t.effect) for t in pod.tolerations] == [("nvidia.com/gpu", "Exists", "NoSchedule")]
        assert pod.priority_class_name == "ml-batch"
        assert pod.containers[0].image == TRAINER_IMAGE
        claim = core.read_namespaced_persistent_volume_claim("defaulted-cache", guarded.team).spec
        assert claim.storage_class_name == "fast-rwx" and claim.resources.requests["storage"] == "200Gi"

        def applied():
            obj = guarded.custom.get_namespaced_custom_object(GROUP, VERSION, guarded.team, PLURAL, "defaulted")
            return (obj.get("status") or {}).get("appliedDefaults")

        shown = guarded.cp.wait_for(applied, 30, "status.appliedDefaults")
        assert shown == {"image": TRAINER_IMAGE, **copy.deepcopy(DEFAULTS)}
    finally:
        operator.stop()
        print(f"--- operator log ---\n{operator.log()[-4000:]}")
