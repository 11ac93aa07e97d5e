"""A local Kubernetes cluster for development and tests (no Docker).

``sftctl dev-cluster up|down|status|import-image|stop|start|restart`` (see ``cli`` and ``cluster``): etcd, kube-apiserver,
kube-controller-manager, kube-scheduler and kwok simulated GPU nodes, built from their
Go modules by ``scripts/k8s-bin.sh``, plus the real node ``sft-node-0`` (kubelet,
containerd, runc, CNI bridge, kube-proxy, CoreDNS; ``scripts/node-bin.sh``; see ``node``).
``stop|start|restart COMPONENT`` stop one process (a crash with ``--kill``) and bring it back
as it was: the chaos tests' faults. Development and test tools, not product features.
"""

from .cli import add_subparser
from .cluster import (
    Started,
    down,
    import_images,
    restart_component,
    start_component,
    status,
    stop_component,
    up,
)
from .control_plane import COMPONENTS
from .node_objects import create_spare_volumes, create_volume
from .processes import DevClusterError
from .state import ClusterInfo, default_state_dir, ensure_binaries, ensure_node_binaries

__all__ = [
    "COMPONENTS",
    "ClusterInfo",
    "DevClusterError",
    "add_subparser",
    "create_spare_volumes",
    "create_volume",
    "default_state_dir",
    "down",
    "ensure_binaries",
    "ensure_node_binaries",
    "import_images",
    "restart_component",
    "start_component",
    "Started",
    "status",
    "stop_component",
    "up",
]
