"""Pure parts of the dev cluster's real node: configs, command lines, rules, volumes, image
archives (the running node is tested in tests/integration/test_real_node.py)."""

import hashlib
import io
import ipaddress
import json
import tarfile
import tomllib
from pathlib import Path

from sft_devcluster import control_plane, kwok, node_objects
from sft_devcluster import node as realnode
from sft_devcluster.images import archive_images, normalize
from sft_devcluster.oci import image_blobs, rootfs_layer, write_archive
from sft_devcluster.pki import Pki

LAYOUT = realnode.NodeLayout(Path("/state/node"), Path("/cache/node"), Path("/k8s/bin"))
PORTS = {k: 1000 + i for i, k in enumerate(("kubelet", "kubelet-healthz", "kube-proxy-healthz",
                                            "kube-proxy-metrics", "coredns-health", "coredns-ready"))}


def test_containerd_clamps_oom_scores_and_keeps_its_sockets_and_state_off_shared_paths():
    cfg = tomllib.loads(realnode.containerd_config(LAYOUT, "localhost/sft-node/pause:3.10.2"))
    runtime = cfg["plugins"]["io.containerd.cri.v1.runtime"]
    assert runtime["restrict_oom_score_adj"] is True  # without it every sandbox fails here
    assert runtime["netns_mounts_under_state_dir"] is True and runtime["enable_cdi"] is False
    runc = runtime["containerd"]["runtimes"]["runc"]["options"]
    assert runc["SystemdCgroup"] is False and runc["Root"].startswith("/run/sft-node/")
    assert cfg["root"] == "/cache/node/containerd" and cfg["state"].startswith("/run/sft-node/")
    assert cfg["plugins"]["io.containerd.server.v1.grpc"]["address"] == str(LAYOUT.socket)
    # Shim sockets are <dir>/<64 hex>: the dir must be short for the 108-byte socket path limit.
    assert len(cfg["plugins"]["io.containerd.shim.v1.manager"]["socket_dir"]) + 1 + 64 < 108
    assert "io.containerd.nri.v1.nri" in cfg["disabled_plugins"]
    assert cfg["plugins"]["io.containerd.cri.v1.images"]["pinned_images"]["sandbox"] == "localhost/sft-node/pause:3.10.2"


def test_kubelet_runs_on_cgroup_v1_with_its_own_cgroup_root_and_the_cluster_dns():
    cfg = realnode.kubelet_config(LAYOUT, Path("/pki"), PORTS)
    assert (cfg["failCgroupV1"], cfg["cgroupDriver"], cfg["cgroupRoot"]) == (False, "cgroupfs", "/sft-node")
    assert cfg["address"] == realnode.NODE_IP and cfg["clusterDNS"] == [realnode.NODE_IP]
    assert cfg["clusterDomain"] == "cluster.local" and cfg["authentication"]["anonymous"]["enabled"] is False
    assert cfg["imageGCHighThresholdPercent"] == 100  # imported images can't be pulled again
    assert cfg["containerRuntimeEndpoint"] == f"unix://{LAYOUT.socket}"
    assert cfg["podLogsDir"].startswith("/state/node/") and cfg["resolvConf"].startswith("/state/node/")


def test_kube_proxy_uses_iptables_and_leaves_host_sysctls_alone():
    cfg = realnode.kube_proxy_config(LAYOUT, PORTS)
    assert cfg["mode"] == "iptables" and cfg["oomScoreAdj"] == 0
    assert cfg["iptables"]["localhostNodePorts"] is False  # would set route_localnet
    assert cfg["conntrack"]["maxPerCore"] == 0 and cfg["clusterCIDR"] == realnode.POD_CIDR


def test_pod_network_has_no_default_route_and_no_masquerade():
    (bridge,) = realnode.cni_conflist(LAYOUT)["plugins"]
    assert bridge["bridge"] == realnode.BRIDGE and bridge["ipMasq"] is False and bridge["isGateway"] is False
    assert [r["dst"] for r in bridge["ipam"]["routes"]] == [realnode.SERVICE_CIDR]
    (rng,) = bridge["ipam"]["ranges"][0]
    net = ipaddress.ip_network(rng["subnet"])
    assert ipaddress.ip_address(rng["gateway"]) in net and ipaddress.ip_address(realnode.NODE_IP) in net
    assert ipaddress.ip_address(rng["rangeStart"]) > ipaddress.ip_address(realnode.NODE_IP)


def test_netfilter_rules_drop_traffic_between_the_bridge_and_other_interfaces():
    rules = realnode.netfilter_rules()
    assert all(rule[-2:] == ["-j", "DROP"] and realnode.RULE_TAG in rule for _, _, rule in rules)
    forward = [" ".join(r) for t, c, r in rules if (t, c) == ("mangle", "FORWARD")]
    assert f"-i {realnode.BRIDGE} ! -o {realnode.BRIDGE}" in forward[0]  # pods -> elsewhere
    assert f"! -i {realnode.BRIDGE} -o {realnode.BRIDGE}" in forward[1]  # elsewhere -> pods
    inbound = {r[1] for t, c, r in rules if (t, c) == ("raw", "PREROUTING")}
    assert inbound == {realnode.POD_CIDR, realnode.SERVICE_CIDR}


def test_coredns_answers_for_the_cluster_on_the_node_ip_and_forwards_nothing():
    text = realnode.corefile(LAYOUT, PORTS)
    assert f"bind {realnode.NODE_IP}" in text and "kubernetes cluster.local" in text
    assert "forward" not in text and "ready 127.0.0.1:1005" in text
    assert text.index(".:53 {") > text.index("kubernetes cluster.local") and "rcode NXDOMAIN" in text


def test_gpus_are_advertised_with_a_json_patch_of_node_status():
    assert realnode.gpu_capacity_patch(8) == [{"op": "add", "path": "/status/capacity/nvidia.com~1gpu", "value": "8"}]


def test_api_server_listens_on_the_node_ip_with_a_real_node_and_on_loopback_without(tmp_path):
    ports = dict.fromkeys(("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok"), 1)
    with_node = " ".join(control_plane.component_commands(Path("/bin"), tmp_path, Pki(tmp_path), ports, real_node=True)
                         ["kube-apiserver"])
    assert f"--bind-address={realnode.NODE_IP}" in with_node and f"--advertise-address={realnode.NODE_IP}" in with_node
    assert "--endpoint-reconciler-type=lease" in with_node and "--kubelet-client-certificate=" in with_node
    without = " ".join(control_plane.component_commands(Path("/bin"), tmp_path, Pki(tmp_path), ports)["kube-apiserver"])
    assert "--bind-address=127.0.0.1" in without and "--endpoint-reconciler-type=none" in without
    assert "NodeRestriction" in with_node


def test_kubelet_command_names_the_node_and_labels_it():
    kubelet = realnode.component_commands(LAYOUT)["kubelet"]
    assert f"--hostname-override={realnode.NODE_NAME}" in kubelet and f"--node-ip={realnode.NODE_IP}" in kubelet
    assert "--node-labels=nvidia.com/gpu.present=true,sft.dev/real-node=true" in kubelet


def test_kwok_nodes_are_tainted_only_next_to_a_real_node():
    assert "taints" not in kwok.kwok_node("kwok-gpu-0")["spec"]
    assert kwok.kwok_node("kwok-gpu-0", tainted=True)["spec"]["taints"] == [kwok.KWOK_TAINT]


def test_local_volumes_are_pre_bound_to_their_claim_on_the_real_node():
    pv, pvc = node_objects.local_volume(Path("/state"), "team-a", "models")
    assert pv["spec"]["local"]["path"] == "/state/volumes/team-a/models"
    assert pv["spec"]["claimRef"] == {"namespace": "team-a", "name": "models"}
    assert pvc["spec"]["volumeName"] == pv["metadata"]["name"]
    term = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]
    assert term["values"] == [realnode.NODE_NAME]
    assert node_objects.LOCAL_STORAGE_CLASS["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"] == "true"
    # one node: every pod of a multi-node job mounts it there, so several may write it
    assert pv["spec"]["accessModes"] == pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_spare_volumes_are_unclaimed_so_any_claim_of_the_default_class_binds_to_one():
    pv = node_objects.spare_volume(Path("/state"), 3)
    assert "claimRef" not in pv["spec"] and pv["spec"]["local"]["path"] == "/state/spare-volumes/3"
    assert pv["spec"]["storageClassName"] == node_objects.LOCAL_STORAGE_CLASS["metadata"]["name"]
    assert {"ReadWriteOnce", "ReadWriteMany"} <= set(pv["spec"]["accessModes"])  # a cache for one node or several
    assert pv["spec"]["capacity"]["storage"] == "100Gi"  # the operator's default cache (50Gi) fits


def test_node_rbac_lets_the_api_server_reach_the_kubelet_and_coredns_watch():
    objs = {(o["kind"], o["metadata"]["name"]): o for o in node_objects.node_rbac()}
    assert objs["ClusterRoleBinding", "sft-dev:apiserver-kubelet-client"]["roleRef"]["name"] == "system:kubelet-api-admin"
    assert objs["ClusterRoleBinding", "sft-dev:coredns"]["subjects"][0]["name"] == "sft-dev:coredns"
    rules = objs["ClusterRole", "sft-dev:coredns"]["rules"]
    assert {"services", "namespaces", "pods"} <= set(rules[0]["resources"]) and rules[0]["verbs"] == ["list", "watch"]


def test_oci_archive_is_reproducible_and_names_its_image(tmp_path):
    root = tmp_path / "rootfs"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tool").write_bytes(b"#!/bin/sh\n")
    (root / "bin" / "tool").chmod(0o755)
    (root / "bin" / "alias").symlink_to("tool")
    first = image_blobs(rootfs_layer(root), "localhost/x/tool:1", {"Cmd": ["/bin/tool"]})
    (root / "bin" / "tool").touch()  # a new mtime changes nothing
    assert image_blobs(rootfs_layer(root), "localhost/x/tool:1", {"Cmd": ["/bin/tool"]}) == first
    write_archive(first, tmp_path / "img.tar")
    (ref, image_id), = archive_images(tmp_path / "img.tar").items()
    config_blob = next(v for k, v in first.items() if k.startswith("blobs/") and b'"rootfs"' in v)
    assert ref == "localhost/x/tool:1" and json.loads(config_blob)["config"]["Cmd"] == ["/bin/tool"]
    assert f"blobs/sha256/{image_id.split(':')[1]}" in first
    with tarfile.open(fileobj=io.BytesIO(rootfs_layer(root))) as layer:
        assert {m.name: (m.uid, m.mtime) for m in layer} == {"bin": (0, 0), "bin/alias": (0, 0), "bin/tool": (0, 0)}


def test_docker_archives_are_read_by_their_repo_tags_and_config_digest(tmp_path):
    config = b'{"config": {}}'
    manifest = [{"Config": "abc.json", "RepoTags": ["ghcr.io/sft-operator/trainer:0.1.0", "busybox"], "Layers": []}]
    with tarfile.open(tmp_path / "d.tar", "w") as tar:
        for name, data in (("abc.json", config), ("manifest.json", json.dumps(manifest).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    images = archive_images(tmp_path / "d.tar")
    digest = "sha256:" + hashlib.sha256(config).hexdigest()
    assert images == {"ghcr.io/sft-operator/trainer:0.1.0": digest, "docker.io/library/busybox:latest": digest}


def test_references_are_normalized_like_the_cri_lists_them():
    assert normalize("busybox") == "docker.io/library/busybox:latest"
    assert normalize("team/app:1") == "docker.io/team/app:1"
    assert normalize("localhost/sft-node/pause:3.10.2") == "localhost/sft-node/pause:3.10.2"
    assert normalize("registry:5000/app") == "registry:5000/app:latest"
