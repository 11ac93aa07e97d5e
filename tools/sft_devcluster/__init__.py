"""A local Kubernetes control plane for development and tests (no Docker).

``sftctl dev-cluster up|down|status`` (see ``cluster``): etcd, kube-apiserver,
kube-controller-manager, kube-scheduler and kwok simulated GPU nodes, built from their
Go modules by ``scripts/k8s-bin.sh``, plus ``sft-local-0``, a process-backed node for
real execution. Both are development and test tools, not product features.
"""

from .cluster import (
    ClusterInfo,
    DevClusterError,
    add_subparser,
    default_state_dir,
    down,
    ensure_binaries,
    status,
    up,
)

__all__ = [
    "ClusterInfo",
    "DevClusterError",
    "add_subparser",
    "default_state_dir",
    "down",
    "ensure_binaries",
    "status",
    "up",
]
