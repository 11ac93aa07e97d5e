"""Pure parts of the dev cluster (the running cluster is tested in tests/integration)."""

from pathlib import Path

import pytest
import yaml

from sft_devcluster import cluster
from sft_devcluster.pki import Pki
from sft_devcluster.process_node import (
    PodSetupError,
    exit_code_of,
    expand,
    field_ref,
    mount_script,
    resource_field_ref,
    stage_root,
)

POD = {
    "metadata": {"name": "demo-0", "namespace": "team-a", "uid": "u-1",
                 "annotations": {"batch.kubernetes.io/job-completion-index": "3"}, "labels": {"b": "2", "a": "1"}},
    "spec": {"nodeName": "sft-local-0"},
}


def test_expand_follows_kubelet_rules():
    env = {"RANK": "3", "HOST": "h"}
    assert expand("--node-rank=$(RANK) $(HOST):$(PORT)", env) == "--node-rank=3 h:$(PORT)"
    assert expand("$$(RANK) costs $$5", env) == "$(RANK) costs $5"


def test_field_refs_cover_the_downward_api_our_pods_use():
    assert field_ref(POD, "metadata.annotations['batch.kubernetes.io/job-completion-index']") == "3"
    assert field_ref(POD, "metadata.namespace") == "team-a"
    assert field_ref(POD, "metadata.labels") == 'a="1"\nb="2"'
    assert field_ref(POD, "spec.serviceAccountName") == "default"
    with pytest.raises(PodSetupError):
        field_ref(POD, "spec.nothing")


def test_resource_field_ref_rounds_up_in_divisor_units():
    container = {"resources": {"limits": {"cpu": "1500m", "memory": "1Gi"}}}
    assert resource_field_ref(container, {"resource": "limits.cpu"}, {}) == "2"
    assert resource_field_ref(container, {"resource": "limits.memory", "divisor": "1Mi"}, {}) == "1024"
    assert resource_field_ref({}, {"resource": "limits.cpu"}, {"cpu": "2"}) == "2"


def test_signals_read_as_128_plus_signal():
    assert (exit_code_of(-9), exit_code_of(-15), exit_code_of(65)) == (137, 143, 65)


def test_mount_script_stages_sources_then_mounts_targets():
    script = mount_script([("/src dir", "/etc/sft", True), ("/v", "/data", False)], "/work dir", Path("/run/s"))
    assert "stage '/src dir' /run/s/0" in script and "stage /v /run/s/1" in script
    assert script.index("stage /v") < script.index("mnt /run/s/0 /etc/sft ro") < script.index("mnt /run/s/1 /data rw")
    assert script.rstrip().endswith('exec "$@"') and "cd '/work dir'" in script


def test_staging_avoids_directories_the_pod_mounts_over(tmp_path):
    assert stage_root(["/tmp", "/etc/sft"], "u", tmp_path / "pod") == Path("/run/sft-process-node/u")
    assert stage_root(["/run"], "u", Path("/tmp/pod")) == Path("/tmp/pod/stage")
    assert stage_root(["/run", "/tmp"], "u", Path("/tmp/pod")) == Path("/.sft-stage-u")


def test_component_commands_wire_tokens_rbac_and_kwok(tmp_path):
    ports = dict.fromkeys(("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok"), 1)
    cmds = cluster.component_commands(Path("/bin"), tmp_path, Pki(tmp_path / "pki"), ports)
    api = " ".join(cmds["kube-apiserver"])
    assert "--authorization-mode=Node,RBAC" in api and "--service-account-signing-key-file" in api
    kcm = " ".join(cmds["kube-controller-manager"])
    assert "--service-account-private-key-file" in kcm and "--root-ca-file" in kcm and "--leader-elect=false" in kcm
    assert "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake" in cmds["kwok"]


def test_kwok_nodes_have_eight_gpus_and_are_selected_by_annotation():
    node = cluster.kwok_node("kwok-gpu-0")
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"


def test_kwok_stages_include_the_failure_stages_tests_rely_on():
    names = {d["metadata"]["name"] for d in yaml.safe_load_all(cluster.KWOK_STAGES.read_text())}
    assert {"node-initialize", "node-heartbeat-with-lease", "pod-ready", "pod-complete", "pod-delete",
            "sft-pod-exit-code", "sft-pod-oomkill", "pvc-provision"} <= names


def test_load_crds_falls_back_to_the_generated_crd(tmp_path):
    from sft_operator.crd import crd_manifest

    assert cluster.load_crds(tmp_path) == [crd_manifest()]
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(cluster.PLACEHOLDER_CRD | {"metadata": {"name": "x.sft.dev"}}))
    assert [c["metadata"]["name"] for c in cluster.load_crds(tmp_path)] == ["x.sft.dev"]


def test_process_node_puts_back_image_paths_a_pod_mount_would_hide():
    from sft_devcluster.process_node import image_paths, keep_visible

    # A checkout under /tmp (CI clones) stays importable when the trainer pod mounts an emptyDir at /tmp.
    binds = keep_visible(["/tmp", "/etc/sft"], ["/tmp/clone/trainer_image", "/usr/lib/python3", "/tmp"])
    assert binds == [("/tmp/clone/trainer_image", "/tmp/clone/trainer_image", True)]
    assert keep_visible(["/tmp/clone/trainer_image"], ["/tmp/clone/trainer_image"]) == []  # the pod's own mount wins
    assert any(p.endswith("trainer_image") for p in image_paths())
