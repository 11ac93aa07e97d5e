"""The SFTJob CRD on the real API server: what it admits, what it rejects and why,
immutability, the status subresource, printer columns, and Pod Security admission of
the pods our renderer produces."""

from __future__ import annotations

import copy
import json
import re
import uuid
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from sft_operator.api.crd import crd_manifest
from sft_operator.core.validation import problems_in

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "sft.dev", "v1alpha1", "sftjobs"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
INVALID = sorted((ROOT / "tests" / "invalid").glob("*.yaml"))


def _rule_messages(node) -> set[str]:
    if isinstance(node, list):
        return set().union(*map(_rule_messages, node)) if node else set()
    if not isinstance(node, dict):
        return set()
    own = {r["message"] for r in node.get("x-kubernetes-validations", [])}
    return own.union(*map(_rule_messages, node.values()))


RULE_MESSAGES = _rule_messages(crd_manifest())


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def broken_field(path: Path) -> str:
    """The dotted path named on the first line (``# field: spec.x.y``)."""
    first = path.read_text().splitlines()[0]
    assert first.startswith("# field:"), f"{path.name} must start with '# field: <path>'"
    return first.partition(":")[2].strip()


@pytest.fixture(scope="module")
def crd_namespace(control_plane):
    """One namespace for this module's many small create/reject calls."""
    core = client.CoreV1Api(control_plane.api)
    name = f"crd-admission-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


@pytest.fixture
def sftjobs(control_plane):
    return client.CustomObjectsApi(control_plane.api)


def create(sftjobs, namespace: str, doc: dict) -> dict:
    doc = copy.deepcopy(doc)
    doc["metadata"]["namespace"] = namespace
    return sftjobs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, doc, field_validation="Strict")


def test_corpora_are_present():
    # The parametrised tests below would silently shrink to nothing without them.
    assert EXAMPLES, "examples/*.yaml is empty"
    assert INVALID, "tests/invalid/*.yaml is empty"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_valid_example_is_accepted(sftjobs, crd_namespace, path):
    doc = load(path)
    doc["metadata"]["name"] = f"{path.stem}-{uuid.uuid4().hex[:4]}"[:63]
    created = create(sftjobs, crd_namespace, doc)
    assert created["metadata"]["uid"]
    assert created["spec"]["model"]["source"] == doc["spec"]["model"]["source"]


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_manifest_is_rejected_naming_the_field(sftjobs, crd_namespace, path):
    field = broken_field(path)
    doc = load(path)
    if field != "metadata.name":  # unique names, so a wrongly accepted one can't hide the next
        doc["metadata"]["name"] = f"{path.stem}-{uuid.uuid4().hex[:4]}"[:63]
    with pytest.raises(ApiException) as err:
        create(sftjobs, crd_namespace, doc)
    assert err.value.status in (400, 422), err.value.body
    last_segment = field.rsplit(".", 1)[-1]
    assert last_segment in err.value.body, f"{path.name}: rejection doesn't name {field!r}: {err.value.body}"
    # sftctl validate evaluates the CRD's CEL rules offline: where it reports a rule's message, the API server
    # reports the same message at the same field.
    said = json.loads(err.value.body)["message"]
    for problem in problems_in(load(path)):
        if problem.message in RULE_MESSAGES:
            where = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", problem.path)
            assert f"{where}: Invalid value" in said and problem.message in said, (
                f"{path.name}: sftctl says {problem}; the API server: {said}")


@pytest.fixture
def recipe(sftjobs, namespace) -> dict:
    doc = load(ROOT / "examples" / "llama2-7b-recipe.yaml")
    doc["metadata"]["name"] = "recipe"
    return create(sftjobs, namespace, doc)


def test_training_spec_is_immutable(sftjobs, namespace, recipe):
    patch = {"spec": {"hyperparameters": {"learningRate": 1e-4}}}
    with pytest.raises(ApiException) as err:
        sftjobs.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "recipe", patch)
    assert err.value.status == 422
    assert "hyperparameters" in err.value.body and "immutable" in err.value.body


def test_suspend_can_be_toggled(sftjobs, namespace, recipe):
    for suspend in (True, False):
        patched = sftjobs.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "recipe", {"spec": {"runPolicy": {"suspend": suspend}}})
        assert patched["spec"]["runPolicy"]["suspend"] is suspend


def test_status_subresource_is_separate_from_spec(sftjobs, namespace, recipe):
    status = {"phase": "Running", "progress": {"percent": 42, "step": 420, "totalSteps": 1000},
              "metrics": {"trainLoss": 1.25}}
    sftjobs.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, "recipe", {"status": status})
    got = sftjobs.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "recipe")
    assert got["status"]["progress"]["percent"] == 42 and got["status"]["metrics"]["trainLoss"] == 1.25
    assert got["metadata"]["generation"] == recipe["metadata"]["generation"]
    # Writes to the main resource don't touch status.
    sftjobs.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "recipe",
        {"spec": {"runPolicy": {"suspend": True}}, "status": {"phase": "Succeeded"}})
    assert sftjobs.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "recipe")["status"]["phase"] == "Running"


def test_kubectl_get_shows_the_printer_columns(control_plane, sftjobs, namespace, recipe):
    sftjobs.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, "recipe", {
        "status": {"phase": "Running", "progress": {"percent": 42}, "metrics": {"trainLoss": 1.25}}})
    header, row = control_plane.kubectl("get", "sftjobs", "-n", namespace).stdout.splitlines()
    assert header.split() == ["NAME", "PHASE", "PROGRESS", "LOSS", "EVALUATION", "AGE"]
    assert row.split()[:4] == ["recipe", "Running", "42", "1.25"]
    # No gates, no EvaluationPassed condition: kubectl leaves the cell blank (columns are aligned).
    assert row[header.index("EVALUATION"):header.index("AGE")].strip() == ""


def test_restricted_namespace_admits_the_rendered_job_pods(control_plane, sftjobs):
    from sft_operator.core.render import RenderOptions, render_children

    core, batch = client.CoreV1Api(control_plane.api), client.BatchV1Api(control_plane.api)
    ns = f"restricted-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": ns, "labels": {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest"}}})
    try:
        control_plane.wait_for(lambda: core.read_namespaced_service_account("default", ns), 30, "the default SA")
        # Pod Security is really enforced here: a privileged pod is refused.
        with pytest.raises(ApiException) as err:
            core.create_namespaced_pod(ns, {"metadata": {"name": "privileged"}, "spec": {"containers": [
                {"name": "c", "image": "busybox", "securityContext": {"privileged": True}}]}})
        assert err.value.status == 403 and "PodSecurity" in err.value.body

        doc = load(ROOT / "examples" / "minimal.yaml")
        sftjob = create(sftjobs, ns, doc)
        options = RenderOptions(progress_base_url="https://sft-operator.sft-system.svc:8443")
        for child in render_children(sftjob, options):
            child["metadata"]["namespace"] = ns
            kind = child["kind"]
            if kind == "ConfigMap":
                core.create_namespaced_config_map(ns, child)
            elif kind == "Service":
                core.create_namespaced_service(ns, child)
            elif kind == "PersistentVolumeClaim":  # the fetch cache (minimal.yaml names a hub model)
                core.create_namespaced_persistent_volume_claim(ns, child)
            elif kind == "Job":
                batch.create_namespaced_job(ns, child)
                job_name = child["metadata"]["name"]
            else:
                pytest.fail(f"unexpected child kind {kind}")

        pods = control_plane.wait_for(
            lambda: core.list_namespaced_pod(ns, label_selector=f"job-name={job_name}").items, 60,
            "the Job controller to create pods")
        assert pods and pods[0].spec.init_containers[0].name == "fetch"  # admitted, fetch stage included
        events = core.list_namespaced_event(ns, field_selector=f"involvedObject.name={job_name}").items
        assert not [e.message for e in events if e.reason == "FailedCreate"]
    finally:
        core.delete_namespace(ns)
