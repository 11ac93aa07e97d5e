"""The children an SFTJob renders to."""

import pytest

from sft_operator.api.types import SFTJob
from sft_operator.core.render import RenderOptions, render_children
from sft_contract.exit_codes import NON_RETRIABLE

from .helpers import ROOT, load, manifest


def _by_kind(children):
    return {c["kind"]: c for c in children}


def _job(doc, **options):
    return _by_kind(render_children(doc, RenderOptions(**options)))["Job"]


def test_multi_node_example_renders_indexed_job_service_and_config():
    doc = load(ROOT / "examples" / "multi-node-lora.yaml")
    kids = _by_kind(render_children(doc))
    assert set(kids) == {"ConfigMap", "Service", "PersistentVolumeClaim", "Job"}
    # the hub model is fetched once into a cache every node mounts
    assert kids["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
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


def test_pod_failure_policy_fails_fast_on_trainer_and_fetch_codes_and_ignores_disruptions():
    policy = _job(manifest())["spec"]["podFailurePolicy"]["rules"]  # a hub model: a fetch stage
    fail = sorted(int(c) for c in NON_RETRIABLE)
    assert {68, 73, 77} <= set(fail)  # NotFound, CacheTooSmall, AccessDenied: no retry can fix them
    assert policy[:2] == [{"action": "FailJob", "onExitCodes": {"containerName": name, "operator": "In", "values": fail}}
                          for name in ("trainer", "fetch")]
    # exit 75 (Interrupted: SIGTERM, checkpoint saved, or mid-transfer) from any rank or the fetch stage is a
    # disruption: every rank of a multi-node run exits 75 or 76 (PeerLost) when one pod is evicted, but only
    # that pod carries DisruptionTarget, and a pod deleted by a person carries none; 79 (Superseded) is a
    # partitioned pod whose replacement already took its place
    assert policy[2:4] == [{"action": "Ignore", "onExitCodes": {"containerName": name, "operator": "In",
                                                                "values": [75, 76, 79]}}
                           for name in ("trainer", "fetch")]
    assert policy[4] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert _job(manifest())["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    local = manifest(model={"source": "pvc://models/base"})  # nothing to fetch: the stage still checks the data
    assert [r.get("onExitCodes", {}).get("containerName") for r in _job(local)["spec"]["podFailurePolicy"]["rules"]] == \
        ["trainer", "fetch", "trainer", "fetch", None]


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
    from sft_contract.spec import TrainingSpec

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


# ---- object storage: the cache claim, the fetch stage, credentials (docs/storage.md) -------------


def _env(container):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_s3_sources_get_a_cache_claim_a_fetch_stage_and_the_credentials_by_reference():
    doc = load(ROOT / "examples" / "s3-mlflow.yaml")
    doc["metadata"]["uid"] = "u-1"
    kids = _by_kind(render_children(doc))
    claim = kids["PersistentVolumeClaim"]
    assert claim["metadata"]["name"] == "qwen-s3-mlflow-cache"
    assert claim["metadata"]["labels"]["sft.dev/job-name"] == "qwen-s3-mlflow"
    assert claim["metadata"]["ownerReferences"][0]["uid"] == "u-1"  # deleted with the SFTJob
    assert claim["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "20Gi"}}}
    pod = kids["Job"]["spec"]["template"]["spec"]
    (fetch,) = pod["initContainers"]
    (trainer,) = pod["containers"]
    assert fetch["command"] == ["python", "-m", "sft_trainer.fetch"]
    assert fetch["args"] == ["--config", "/etc/sft/config.json", "--world-size=1"]  # for the data check's steps
    assert fetch["image"] == trainer["image"] and fetch["securityContext"] == trainer["securityContext"]
    assert "nvidia.com/gpu" not in str(fetch["resources"])  # the trainer holds the GPU; init runs before it
    cache = {"name": "cache", "persistentVolumeClaim": {"claimName": "qwen-s3-mlflow-cache"}}
    assert cache in pod["volumes"]
    for container in (fetch, trainer):
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["cache"] == "/mnt/sft-cache" and mounts["progress-token"] and mounts["config"]
        env = _env(container)
        assert env["SFT_CACHE_DIR"] == "/mnt/sft-cache" and env["HF_HOME"] == "/mnt/sft-cache/hf"
        assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "s3-credentials", "key": "AWS_ACCESS_KEY_ID"}}
        assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "s3-credentials", "key": "AWS_SECRET_ACCESS_KEY"}}
        assert "AWS_SESSION_TOKEN" not in env
        assert env["MLFLOW_TRACKING_TOKEN"] == {"secretKeyRef": {"name": "mlflow-token", "key": "token"}}
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"


def test_a_named_cache_claim_is_mounted_and_not_created():
    doc = load(ROOT / "examples" / "s3-mlflow.yaml")
    doc["spec"]["storage"]["cache"] = {"claimName": "team-cache"}
    doc["spec"]["storage"]["s3"]["credentialsSecretRef"]["sessionTokenKey"] = "token"
    kids = _by_kind(render_children(doc))
    assert "PersistentVolumeClaim" not in kids
    pod = kids["Job"]["spec"]["template"]["spec"]
    assert {"name": "cache", "persistentVolumeClaim": {"claimName": "team-cache"}} in pod["volumes"]
    assert _env(pod["containers"][0])["AWS_SESSION_TOKEN"] == {"secretKeyRef": {"name": "s3-credentials", "key": "token"}}


def test_without_a_credentials_reference_no_aws_variable_is_set_and_the_sdk_chain_applies():
    doc = load(ROOT / "examples" / "s3-mlflow.yaml")
    del doc["spec"]["storage"]["s3"]["credentialsSecretRef"]
    env = _env(_job(doc)["spec"]["template"]["spec"]["containers"][0])
    assert not [k for k in env if k.startswith("AWS_")]


def test_a_multi_node_job_gets_a_read_write_many_cache_of_the_default_size():
    doc = load(ROOT / "examples" / "s3-mlflow.yaml")
    doc["spec"]["resources"]["nodes"] = 2
    del doc["spec"]["storage"]["cache"]
    claim = _by_kind(render_children(doc))["PersistentVolumeClaim"]
    assert claim["spec"] == {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "50Gi"}}}
    doc["spec"]["storage"]["cache"] = {"size": "100Gi", "storageClassName": "fast-rwx"}
    assert _by_kind(render_children(doc))["PersistentVolumeClaim"]["spec"]["storageClassName"] == "fast-rwx"


def test_a_job_with_nothing_to_fetch_has_no_cache_and_its_fetch_stage_reads_the_claims_to_check_the_data():
    doc = manifest(model={"source": "pvc://models/base"}, output={"destination": "pvc://out/run-1"},
                   resources={"nodes": 2, "gpusPerNode": 4})
    kids = _by_kind(render_children(doc))
    assert set(kids) == {"ConfigMap", "Service", "Job"}
    pod = kids["Job"]["spec"]["template"]["spec"]
    assert not [v for v in pod["volumes"] if v["name"] == "cache"]
    env = _env(pod["containers"][0])
    assert "SFT_CACHE_DIR" not in env and env["HF_HOME"] == "/tmp/hf"
    (fetch,) = pod["initContainers"]
    assert fetch["args"][-1] == "--world-size=8"
    claims = {m["mountPath"]: m["readOnly"] for m in fetch["volumeMounts"] if m["mountPath"].startswith("/mnt/pvc/")}
    assert claims == {"/mnt/pvc/datasets": True, "/mnt/pvc/models": True, "/mnt/pvc/out": True}  # it writes none
    trainer = {m["mountPath"]: m["readOnly"] for m in pod["containers"][0]["volumeMounts"] if "/mnt/pvc/" in m["mountPath"]}
    assert trainer["/mnt/pvc/out"] is False


def test_an_s3_output_alone_gets_a_cache_to_stage_it():
    doc = manifest(model={"source": "pvc://models/base"}, output={"destination": "s3://models/run-1"})
    kids = _by_kind(render_children(doc))
    assert "PersistentVolumeClaim" in kids


def test_the_trainer_gets_the_pods_grace_period_to_save():
    # torchrun would SIGKILL its workers 30 s after SIGTERM; the launcher passes them this instead.
    job = _job(manifest(runPolicy={"terminationGracePeriodSeconds": 900}))
    pod = job["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 900
    assert _env(pod["containers"][0])["SFT_TERMINATION_GRACE_SECONDS"] == "900"
