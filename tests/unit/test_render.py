"""The children an SFTJob renders to."""

import pytest

from sft_operator.api import SFTJob
from sft_operator.render import RenderOptions, render_children
from sft_trainer.exit_codes import NON_RETRIABLE

from .helpers import ROOT, load, manifest


def _by_kind(children):
    return {c["kind"]: c for c in children}


def _job(doc, **options):
    return _by_kind(render_children(doc, RenderOptions(**options)))["Job"]


def test_multi_node_example_renders_indexed_job_service_and_config():
    doc = load(ROOT / "examples" / "multi-node-lora.yaml")
    kids = _by_kind(render_children(doc))
    assert set(kids) == {"ConfigMap", "Service", "Job"}
    job = kids["Job"]["spec"]
    assert (job["completionMode"], job["completions"], job["parallelism"]) == ("Indexed", 2, 2)
    assert kids["Service"]["spec"]["clusterIP"] == "None"
    assert job["template"]["spec"]["subdomain"] == kids["Service"]["metadata"]["name"]
    args = job["template"]["spec"]["containers"][0]["args"]
    assert "--nnodes=2" in args and "--nproc-per-node=8" in args
    assert "--node-rank=$(JOB_COMPLETION_INDEX)" in args
    assert "--master-addr=llama2-13b-lora-0.llama2-13b-lora" in args
    assert kids["Job"]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    resources = job["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "8"


def test_children_are_owned_by_the_sftjob_once_it_exists():
    doc = manifest()
    doc["metadata"]["uid"] = "1234-abcd"
    for child in render_children(doc):
        (ref,) = child["metadata"]["ownerReferences"]
        assert ref == {
            "apiVersion": "sft.dev/v1alpha1",
            "kind": "SFTJob",
            "name": "demo",
            "uid": "1234-abcd",
            "controller": True,
            "blockOwnerDeletion": True,
        }


def test_pod_failure_policy_fails_fast_on_trainer_codes_and_ignores_disruptions():
    policy = _job(manifest())["spec"]["podFailurePolicy"]["rules"]
    assert policy[0]["action"] == "FailJob"
    assert policy[0]["onExitCodes"]["values"] == sorted(int(c) for c in NON_RETRIABLE)
    # exit 75 (Interrupted, checkpoint saved) from any rank is a disruption: every rank of a multi-node
    # run exits 75 when one pod is evicted, but only that pod carries DisruptionTarget
    assert policy[1] == {"action": "Ignore", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [75]}}
    assert policy[2] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert _job(manifest())["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_the_tmp_scratch_volume_is_bounded_and_overridable():
    def tmp(doc):
        return next(v for v in _job(doc)["spec"]["template"]["spec"]["volumes"] if v["name"] == "tmp")

    assert tmp(manifest()) == {"name": "tmp", "emptyDir": {"sizeLimit": "64Gi"}}
    assert tmp(manifest(resources={"scratchSize": "200Gi"}))["emptyDir"] == {"sizeLimit": "200Gi"}


def test_pvc_sources_are_mounted_and_only_output_is_writable():
    doc = manifest(model={"source": "pvc://models/base"})
    doc["spec"]["output"] = {"destination": "pvc://outputs/demo"}
    pod = _job(doc)["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]["readOnly"]
              for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"datasets": True, "models": True, "outputs": False}
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert {"/mnt/pvc/datasets", "/mnt/pvc/models", "/mnt/pvc/outputs"} <= mounts


def test_token_is_projected_with_our_audience_and_secret_only_referenced():
    doc = manifest(model={"source": "org/m", "tokenSecretRef": {"name": "hf", "key": "token"}})
    pod = _job(doc, token_audience="sft.dev/progress")["spec"]["template"]["spec"]
    projected = next(v for v in pod["volumes"] if "projected" in v)["projected"]["sources"][0]
    assert projected["serviceAccountToken"]["audience"] == "sft.dev/progress"
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    assert pod["automountServiceAccountToken"] is False


def test_progress_url_and_ca_reach_the_trainer():
    pod = _job(manifest(), progress_base_url="https://op.sft-system.svc:8443", progress_ca_pem="PEM")
    env = {e["name"]: e.get("value") for e in pod["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SFT_PROGRESS_URL"] == "https://op.sft-system.svc:8443/v1/namespaces/team-a/sftjobs/demo/progress"
    assert env["SFT_PROGRESS_CA_FILE"] == "/etc/sft/ca.crt"
    config_map = _by_kind(render_children(manifest(), RenderOptions(progress_ca_pem="PEM")))["ConfigMap"]
    assert config_map["data"]["ca.crt"] == "PEM"


def test_config_map_holds_the_training_part_only():
    import json

    data = json.loads(_by_kind(render_children(manifest(resources={"nodes": 3})))["ConfigMap"]["data"]["config.json"])
    assert data["model"]["source"] == "Qwen/Qwen2.5-0.5B" and "resources" not in data
    from sft_trainer.config import TrainingSpec

    assert TrainingSpec.model_validate(data).hyperparameters.learning_rate == 2e-5


def test_run_policy_reaches_the_job():
    job = _job(manifest(runPolicy={"suspend": True, "backoffLimit": 5, "activeDeadlineSeconds": 600}))["spec"]
    assert (job["suspend"], job["backoffLimit"], job["activeDeadlineSeconds"]) == (True, 5, 600)


def test_scheduling_reaches_the_pod():
    pod = _job(manifest(scheduling={"priorityClassName": "high", "nodeSelector": {"pool": "a100"},
                                    "tolerations": [{"key": "gpu", "operator": "Exists"}]}))["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "high"
    assert pod["nodeSelector"] == {"pool": "a100"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists"}]


def test_cpu_job_requests_no_gpu():
    container = _job(manifest(resources={"gpusPerNode": 0, "cpu": "2"}))["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"cpu": "2"}
    assert "--nproc-per-node=1" in container["args"]


def test_invalid_spec_is_refused_before_rendering():
    with pytest.raises(Exception):
        render_children(manifest(hyperparameters={"learningRate": 0}))


def test_rendering_accepts_a_model_instance():
    doc = manifest()
    assert render_children(SFTJob.model_validate(doc)) == render_children(doc)
