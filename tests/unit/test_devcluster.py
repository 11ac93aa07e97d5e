"""Pure parts of the dev cluster (the running cluster is tested in tests/integration)."""

from pathlib import Path

import yaml

from sft_devcluster import cluster
from sft_devcluster.pki import Pki


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
