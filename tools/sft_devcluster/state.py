"""Where a dev cluster lives: the cache and state folders, ``cluster.json`` (``ClusterInfo``: ports,
pids and everything a command line depends on), the control-plane and node binaries
(``scripts/k8s-bin.sh``, ``scripts/node-bin.sh``), the product's image archives, and which
components are running."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import node as realnode
from .processes import DevClusterError, running

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "k8s-bin.sh"
NODE_BUILD_SCRIPT = REPO_ROOT / "scripts" / "node-bin.sh"
# Stop order: consumers first, storage last.
CONTROL_PLANE = ("kwok", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd")
QUEUE = ("kueue",)  # with `up --kueue`: stopped first, it calls the API server
ALL_COMPONENTS = (*QUEUE, *realnode.COMPONENTS, *CONTROL_PLANE)


def cache_dir() -> Path:
    return Path(os.environ.get("SFT_CACHE", Path.home() / ".cache" / "sft-operator"))


def default_state_dir() -> Path:
    return cache_dir() / "dev-cluster"


@dataclass
class ClusterInfo:
    state_dir: str
    kubeconfig: str
    server: str
    bin_dir: str
    ports: dict[str, int]
    pids: dict[str, int] = field(default_factory=dict)
    gpu_nodes: int = 2
    startup_seconds: float = 0.0
    real_node: bool = False
    node_gpus: int = 0
    node_ready_seconds: float = 0.0  # kubelet start -> node Ready and untainted
    # Everything else a command line depends on, so that `start` rebuilds it exactly as `up` did.
    profiling: bool = False
    node_cache: str = ""  # <cache>/node when up ran (SFT_CACHE may differ in the shell that runs start)
    kueue: str = ""  # the Kueue build (scripts/kueue-bin.sh) when Kueue runs in this cluster

    @property
    def components(self) -> tuple[str, ...]:
        """What runs in this cluster, in stop order."""
        queue = QUEUE if self.kueue else ()
        if self.real_node:
            return (*queue, *realnode.COMPONENTS, *CONTROL_PLANE)
        return (*queue, *CONTROL_PLANE)

    @classmethod
    def load(cls, state_dir: Path) -> ClusterInfo | None:
        path = state_dir / "cluster.json"
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))

    def save(self) -> None:
        Path(self.state_dir, "cluster.json").write_text(json.dumps(asdict(self), indent=2) + "\n")


def ensure_binaries() -> Path:
    """Return the directory holding the control-plane binaries, building them if needed
    (minutes on a cold cache; the build log goes to ``<cache>/k8s-bin.log``).

    ``SFT_K8S_BIN`` points at a ready directory and skips the build script.
    """
    override = os.environ.get("SFT_K8S_BIN")
    if override:
        return Path(override)
    if not BUILD_SCRIPT.exists():
        raise DevClusterError(f"{BUILD_SCRIPT} not found; set SFT_K8S_BIN to a directory with the binaries")
    return run_build_script(BUILD_SCRIPT)


def run_build_script(script: Path) -> Path:
    """Run a build script (log: <cache>/<script name>.log); the last line it prints is where it built."""
    log_path = cache_dir() / f"{script.stem}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        proc = subprocess.run(["bash", str(script)], stdout=subprocess.PIPE, stderr=log, text=True)
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise DevClusterError(f"{script} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return Path(proc.stdout.strip().splitlines()[-1])


def node_cache_dir() -> Path:
    return cache_dir() / "node"


def node_binaries_cached() -> bool:
    """scripts/node-bin.sh finished once (it rebuilds what its recipe changed when run)."""
    return (node_cache_dir() / ".complete").exists()


def ensure_node_binaries() -> Path:
    """Build (or reuse) the real node's binaries and images: scripts/node-bin.sh, which
    also adds kubelet and kube-proxy to the control plane's set. Returns <cache>/node."""
    return run_build_script(NODE_BUILD_SCRIPT)


def running_components(state_dir: Path) -> dict[str, int]:
    """Component name -> pid, for the components of ``state_dir`` that are alive."""
    return running(state_dir, ALL_COMPONENTS)


PRODUCT_IMAGES = ("operator", "trainer")


def default_image_archives() -> list[Path]:
    """The product's images as scripts/build-images.sh saves them (<cache>/images/{operator,trainer}-<version>.tar)."""
    return sorted(p for name in PRODUCT_IMAGES for p in (cache_dir() / "images").glob(f"{name}-*.tar"))
