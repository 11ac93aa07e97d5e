"""Platform defaults (the chart's trainer.defaults): what an SFTJob leaves out is filled in at render time,
what it sets is kept, and status.appliedDefaults shows what a job got."""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone

import pytest

from sft_operator.runtime import settings as settings_module
from sft_operator.api.types import PlatformDefaults
from sft_operator.core.render import ANNOTATION_APPLIED_DEFAULTS, RenderOptions, render_children
from sft_operator.core.status import derive_status

from .helpers import manifest

PLATFORM = PlatformDefaults.model_validate({
    "nodeSelector": {"pool": "a100"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "priorityClassName": "ml-batch",
    "cache": {"storageClassName": "fast-rwx", "size": "200Gi"},
})
OPTIONS = RenderOptions(default_image="registry.corp.example/ml/trainer:1.2", defaults=PLATFORM)


def children(doc, options=OPTIONS):
    return {c["kind"]: c for c in render_children(doc, options)}


def pod_spec(kids):
    return kids["Job"]["spec"]["template"]["spec"]


def applied(kids):
    return json.loads(kids["Job"]["metadata"]["annotations"][ANNOTATION_APPLIED_DEFAULTS])


def test_what_a_job_leaves_out_comes_from_the_platform():
    kids = children(manifest())  # a hub model: the operator creates the cache claim
    pod = pod_spec(kids)
    assert pod["nodeSelector"] == {"pool": "a100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["priorityClassName"] == "ml-batch"
    assert {c["image"] for c in pod["containers"] + pod.get("initContainers", [])} == {
        "registry.corp.example/ml/trainer:1.2"}
    claim = kids["PersistentVolumeClaim"]["spec"]
    assert claim["storageClassName"] == "fast-rwx" and claim["resources"]["requests"]["storage"] == "200Gi"
    assert applied(kids) == {
        "image": "registry.corp.example/ml/trainer:1.2",
        "nodeSelector": {"pool": "a100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "priorityClassName": "ml-batch",
        "cache": {"storageClassName": "fast-rwx", "size": "200Gi"},
    }


def test_what_a_job_sets_is_its_own_and_not_reported_as_a_default():
    doc = manifest(
        image="ghcr.io/acme/trainer:2",
        scheduling={"nodeSelector": {"pool": "h100"}, "priorityClassName": "urgent",
                    "tolerations": [{"key": "team-a", "operator": "Exists"}]},
        storage={"cache": {"size": "80Gi"}},
    )
    kids = children(doc)
    pod = pod_spec(kids)
    assert pod["nodeSelector"] == {"pool": "h100"} and pod["priorityClassName"] == "urgent"
    assert pod["tolerations"] == [{"key": "team-a", "operator": "Exists"}]  # replaced, not merged
    assert pod["containers"][0]["image"] == "ghcr.io/acme/trainer:2"
    claim = kids["PersistentVolumeClaim"]["spec"]
    # The job chose the size; the StorageClass it left out is the platform's.
    assert claim["resources"]["requests"]["storage"] == "80Gi" and claim["storageClassName"] == "fast-rwx"
    assert applied(kids) == {"cache": {"storageClassName": "fast-rwx"}}


def test_a_job_with_its_own_cache_claim_gets_no_cache_defaults():
    kids = children(manifest(storage={"cache": {"claimName": "shared-cache"}}))
    assert "PersistentVolumeClaim" not in kids
    assert "cache" not in applied(kids)


def test_without_platform_defaults_a_job_renders_as_before():
    kids = children(manifest(), RenderOptions())
    pod = pod_spec(kids)
    assert not {"nodeSelector", "tolerations", "priorityClassName"} & set(pod)
    claim = kids["PersistentVolumeClaim"]["spec"]
    assert "storageClassName" not in claim and claim["resources"]["requests"]["storage"] == "50Gi"
    assert applied(kids) == {"image": RenderOptions.default_image}


def test_status_shows_the_defaults_the_job_was_rendered_with():
    kids = children(manifest())
    job = {**kids["Job"], "status": {}}
    sftjob = {**manifest(), "metadata": {"name": "demo", "namespace": "team-a", "generation": 1}}
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    status = derive_status(sftjob, job, [], now)
    assert status["appliedDefaults"]["priorityClassName"] == "ml-batch"
    assert status["appliedDefaults"]["cache"] == {"storageClassName": "fast-rwx", "size": "200Gi"}
    # The Job gone (e.g. the operator restarted before listing it): what status said stays.
    assert derive_status({**sftjob, "status": status}, None, [], now)["appliedDefaults"] == status["appliedDefaults"]
    # An annotation someone edited into nonsense never reaches status (its schema would refuse the write).
    job["metadata"]["annotations"][ANNOTATION_APPLIED_DEFAULTS] = '{"priorityClassName": "Not A Name!"}'
    assert "appliedDefaults" not in derive_status(sftjob, job, [], now)


def parse(env: dict[str, str], monkeypatch) -> argparse.Namespace:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    parser = argparse.ArgumentParser()
    settings_module.add_arguments(parser)
    return parser.parse_args([])


def test_the_operator_reads_the_defaults_from_its_environment(monkeypatch):
    args = parse({"SFT_TRAINER_DEFAULTS": json.dumps(PLATFORM.model_dump(mode="json", by_alias=True,
                                                                          exclude_none=True)),
                  "SFT_PROGRESS_ALLOW_PLAINTEXT": "1"}, monkeypatch)
    assert settings_module.from_args(args).render_options().defaults == PLATFORM


@pytest.mark.parametrize("value, field", [
    ('{"tolerations": [{"operator": "Equal"}]}', "tolerations.0"),
    ('{"nodeSelector": {"pool": "a b"}}', "nodeSelector.pool"),
    ('{"cache": {"size": "lots"}}', "cache.size"),
    ('{"priorityclassname": "x"}', "priorityclassname"),
    ('{"image": "ghcr.io/acme/t:1"}', "image"),
    ("not json", "(top)"),
])
def test_bad_defaults_stop_the_operator_naming_the_field(monkeypatch, capsys, value, field):
    with pytest.raises(SystemExit):
        parse({"SFT_TRAINER_DEFAULTS": value}, monkeypatch)
    err = capsys.readouterr().err
    assert "SFT_TRAINER_DEFAULTS" in err and field in err, err
