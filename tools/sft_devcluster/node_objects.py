"""The real node's API objects (pure builders and their creation): the RBAC its clients need, the
``sft-local`` StorageClass, local volumes bound to claims ahead of time, and spare volumes."""

from __future__ import annotations

import shutil
from pathlib import Path

from . import node as realnode
from .pki import COREDNS_USER, KUBELET_CLIENT_USER


def node_rbac() -> list[dict]:
    """What the node's clients need beyond the bootstrap policy: the API server's calls to
    the kubelet (logs, exec) and CoreDNS's watches. kube-proxy's CN has a bootstrap binding."""
    def binding(name: str, role: str, user: str) -> dict:
        return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": {"name": name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]}

    watch = ["list", "watch"]
    return [
        binding("sft-dev:apiserver-kubelet-client", "system:kubelet-api-admin", KUBELET_CLIENT_USER),
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "sft-dev:coredns"},
         "rules": [{"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"], "verbs": watch},
                   {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": watch}]},
        binding("sft-dev:coredns", "sft-dev:coredns", COREDNS_USER),
    ]


# The real node's default StorageClass: local volumes in host folders, made by ``up`` (or
# ``create_volume``) and bound to their claims ahead of time. No dynamic provisioner: one
# node, claims known in advance (the examples' datasets and models), and folders at fixed
# paths that can be filled from the host before a job runs.
LOCAL_STORAGE_CLASS = {
    "apiVersion": "storage.k8s.io/v1",
    "kind": "StorageClass",
    "metadata": {"name": "sft-local", "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
    "provisioner": "kubernetes.io/no-provisioner",
    "reclaimPolicy": "Retain",
    "volumeBindingMode": "WaitForFirstConsumer",
}
# Claims ``up`` creates: what examples/*.yaml read and write.
DEFAULT_CLAIMS = ("datasets", "models")
VOLUMES_NAMESPACE = "default"
# Unclaimed local volumes ``up`` adds, so that a claim nobody made a volume for binds too: the operator's
# cache claim `<job>-cache`, or a user's. Emptied by ``up`` and removed by ``down`` (caches, not data).
SPARE_VOLUMES = 8
SPARE_SIZE = "100Gi"
# One node: every pod that mounts a volume runs on it, so ReadWriteMany is honest, and a multi-node job
# (several pods) may write the claim (the operator refuses a ReadWriteOnce one for that).
LOCAL_ACCESS_MODES = ["ReadWriteMany"]


def volume_path(state_dir: Path, namespace: str, claim: str) -> Path:
    return state_dir / "volumes" / namespace / claim


def _local_pv(name: str, path: Path, size: str, access_modes: list[str]) -> dict:
    return {
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": name, "labels": {"sft.dev/volume": "local"}},
        "spec": {
            "capacity": {"storage": size},
            "accessModes": access_modes,
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": LOCAL_STORAGE_CLASS["metadata"]["name"],
            # A local volume (not hostPath): the kubelet applies the pod's fsGroup, so a
            # non-root trainer can write, and restricted pods may use it.
            "local": {"path": str(path)},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": [realnode.NODE_NAME]}]}]}},
        },
    }


def local_volume(state_dir: Path, namespace: str, claim: str, size: str = "50Gi") -> tuple[dict, dict]:
    """A local PersistentVolume on the real node and the claim bound to it (pure)."""
    pv_name = f"sft-local-{namespace}-{claim}"
    pv = _local_pv(pv_name, volume_path(state_dir, namespace, claim), size, LOCAL_ACCESS_MODES)
    pv["spec"]["claimRef"] = {"namespace": namespace, "name": claim}
    pvc = {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": claim, "namespace": namespace},
        "spec": {"accessModes": LOCAL_ACCESS_MODES, "storageClassName": LOCAL_STORAGE_CLASS["metadata"]["name"],
                 "volumeName": pv_name, "resources": {"requests": {"storage": size}}},
    }
    return pv, pvc


def spare_volumes_dir(state_dir: Path) -> Path:
    return state_dir / "spare-volumes"


def spare_volume(state_dir: Path, index: int, size: str = SPARE_SIZE) -> dict:
    """An unclaimed local PersistentVolume (pure): the scheduler binds a claim of `sft-local` that asks for
    at most ``size``, ReadWriteOnce or ReadWriteMany, to it when the claim's first pod is scheduled."""
    return _local_pv(f"sft-local-spare-{index}", spare_volumes_dir(state_dir) / str(index), size,
                     ["ReadWriteOnce", *LOCAL_ACCESS_MODES])


def create_spare_volumes(api, state_dir: Path, count: int, start: int = 0) -> list[Path]:
    """Empty folders and unclaimed PersistentVolumes ``start``..``start + count - 1`` on the real node."""
    from kubernetes import client

    core = client.CoreV1Api(api)
    out = []
    for index in range(start, start + count):
        pv = spare_volume(state_dir, index)
        path = Path(pv["spec"]["local"]["path"])
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        try:
            core.create_persistent_volume(pv)
        except client.ApiException as exc:
            if exc.status != 409:
                raise
        out.append(path)
    return out


def create_volume(api, state_dir: Path, namespace: str, claim: str, size: str = "50Gi") -> Path:
    """Create (or keep) the claim ``namespace/claim`` on a local volume of the real node;
    returns its host folder, whose content survives ``down``/``up``."""
    from kubernetes import client

    path = volume_path(state_dir, namespace, claim)
    path.mkdir(parents=True, exist_ok=True)
    pv, pvc = local_volume(state_dir, namespace, claim, size)
    core = client.CoreV1Api(api)
    for create, body in ((core.create_persistent_volume, pv),
                         (lambda b: core.create_namespaced_persistent_volume_claim(namespace, b), pvc)):
        try:
            create(body)
        except client.ApiException as exc:
            if exc.status != 409:
                raise
    return path
