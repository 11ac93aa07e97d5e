"""The simulated GPU nodes: kwok's Node objects (``kwok_node``), its stages (``kwok_stages.yaml``) and
the StorageClass and claims its volume stage binds (pods on kwok nodes are simulated)."""

from __future__ import annotations

from pathlib import Path

KWOK_STAGES = Path(__file__).with_name("kwok_stages.yaml")
# The taint kwok nodes carry when a real node is there: pods run for real unless they
# tolerate it (scale and failure simulations do).
KWOK_TAINT = {"key": "sft.dev/kwok-node", "value": "true", "effect": "NoSchedule"}
# kwok manages only nodes carrying this annotation, never the real node.
KWOK_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
GPU_NODE_RESOURCES = {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": "8"}


def kwok_node(name: str, tainted: bool = False) -> dict:
    """A simulated GPU node; kwok fills in conditions and keeps its lease. ``tainted``
    (next to a real node): only pods that tolerate ``KWOK_TAINT`` land there."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {KWOK_NODE_ANNOTATION[0]: KWOK_NODE_ANNOTATION[1]},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                "sft.dev/kwok-node": "true",
                "nvidia.com/gpu.present": "true",
            },
        },
        "spec": {"taints": [dict(KWOK_TAINT)]} if tainted else {},
        "status": {"capacity": dict(GPU_NODE_RESOURCES), "allocatable": dict(GPU_NODE_RESOURCES)},
    }


# Default StorageClass whose claims kwok's volume stages provision and bind.
STORAGE_CLASS = {
    "apiVersion": "storage.k8s.io/v1",
    "kind": "StorageClass",
    "metadata": {"name": "kwok-volume", "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
    "provisioner": "kwok.x-k8s.io/volume",
    "reclaimPolicy": "Delete",
    "volumeBindingMode": "Immediate",
}


def kwok_claim(claim: str, size: str = "50Gi") -> dict:
    """Without a real node: a claim kwok's volume stage binds to a simulated volume, so the
    scheduler places the examples' (simulated) pods."""
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": STORAGE_CLASS["metadata"]["name"],
                     "resources": {"requests": {"storage": size}}}}
