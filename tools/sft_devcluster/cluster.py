"""Start, stop and inspect the local dev/test control plane (no Docker).

``up`` runs, with free ports and a state directory holding pidfiles, logs, certificates
and the admin kubeconfig:

  etcd -> kube-apiserver -> kube-controller-manager, kube-scheduler, kwok (simulated
  GPU nodes ``kwok-gpu-N``), and with ``real_node=True`` the real node ``sft-node-0``
  (see ``node``): containerd, kubelet, kube-proxy and CoreDNS on a private bridge, where
  the API server then listens too (pods reach it as ``kubernetes.default``); without it,
  a kwok-only cluster with everything on loopback (pods are simulated),

then creates the kwok Node objects, installs the CRDs from ``crds/`` and waits until
the API server is ready, every node is Ready, the CRDs are Established and the
service-account controller has made the ``default`` ServiceAccount.

Every process is started in its own session with ``SFT_DEVCLUSTER_DIR=<state dir>``
in its environment, so ``down`` can find and kill each component's whole session
without confusing it with a reused pid.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from . import kueue as kueue_component
from . import node as realnode
from .pki import COREDNS_USER, KUBELET_CLIENT_USER, Pki, ensure_pki
from .processes import (
    MARKER_ENV,
    DevClusterError,
    alive,
    free_port,
    pidfile,
    running,
    session_members,
    signal_all,
    start,
    start_time,
    stop_session,
    wait_gone,
    wait_until,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "k8s-bin.sh"
NODE_BUILD_SCRIPT = REPO_ROOT / "scripts" / "node-bin.sh"
KWOK_STAGES = Path(__file__).with_name("kwok_stages.yaml")
SERVICE_CIDR = realnode.SERVICE_CIDR
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
# Stop order: consumers first, storage last.
CONTROL_PLANE = ("kwok", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd")
QUEUE = ("kueue",)  # with `up --kueue`: stopped first, it calls the API server
ALL_COMPONENTS = (*QUEUE, *realnode.COMPONENTS, *CONTROL_PLANE)
# The taint kwok nodes carry when a real node is there: pods run for real unless they
# tolerate it (scale and failure simulations do).
KWOK_TAINT = {"key": "sft.dev/kwok-node", "value": "true", "effect": "NoSchedule"}
# kwok manages only nodes carrying this annotation, never the real node.
KWOK_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")

GPU_NODE_RESOURCES = {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": "8"}


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


# ---------------------------------------------------------------- binaries


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
    return _run_build_script(BUILD_SCRIPT)


def _run_build_script(script: Path) -> Path:
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
    return _run_build_script(NODE_BUILD_SCRIPT)


# ---------------------------------------------------------------- pure builders


def kubeconfig_dict(server: str, ca_crt: Path, crt: Path, key: Path, user: str) -> dict:
    """A kubeconfig with the credentials embedded, so a copy works anywhere."""
    b64 = lambda p: base64.b64encode(p.read_bytes()).decode()  # noqa: E731
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "sft-dev", "cluster": {"server": server, "certificate-authority-data": b64(ca_crt)}}],
        "users": [{"name": user, "user": {"client-certificate-data": b64(crt), "client-key-data": b64(key)}}],
        "contexts": [{"name": "sft-dev", "context": {"cluster": "sft-dev", "user": user}}],
        "current-context": "sft-dev",
    }


def component_commands(
    bin_dir: Path, state_dir: Path, pki: Pki, ports: dict[str, int], real_node: bool = False, profiling: bool = False,
) -> dict[str, list[str]]:
    """The command line of every control-plane component (pure: no I/O).

    With ``real_node`` the API server listens on the node's bridge address instead of
    loopback, so pods reach it through the ``kubernetes`` Service (whose endpoint it keeps
    with a lease), and it can call the kubelet (logs, exec)."""
    b = lambda name: str(bin_dir / name)  # noqa: E731
    address = realnode.NODE_IP if real_node else "127.0.0.1"
    if real_node:
        node_flags = [
            # A kubelet may change only its own Node and its pods (the flag's values add up).
            "--enable-admission-plugins=NodeRestriction",
            "--endpoint-reconciler-type=lease",
            f"--kubelet-client-certificate={pki.client_crt('apiserver-kubelet-client')}",
            f"--kubelet-client-key={pki.client_key('apiserver-kubelet-client')}",
            f"--kubelet-certificate-authority={pki.ca_crt}",
            "--kubelet-preferred-address-types=InternalIP",
        ]
    else:
        # Endpoints may not hold a loopback address; the in-cluster Service isn't needed.
        node_flags = ["--endpoint-reconciler-type=none"]
    etcd_url = f"http://127.0.0.1:{ports['etcd']}"
    peer_url = f"http://127.0.0.1:{ports['etcd-peer']}"
    kcfg = lambda name: str(state_dir / f"{name}.kubeconfig")  # noqa: E731
    return {
        "etcd": [
            b("etcd"), "--name=dev", f"--data-dir={state_dir / 'etcd'}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=dev={peer_url}", "--initial-cluster-state=new",
            # A throw-away cluster: durability costs seconds per test for nothing.
            "--unsafe-no-fsync", "--log-level=warn",
        ],
        "kube-apiserver": [
            b("kube-apiserver"), f"--etcd-servers={etcd_url}",
            f"--bind-address={address}", f"--advertise-address={address}", f"--secure-port={ports['apiserver']}",
            f"--tls-cert-file={pki.apiserver_crt}", f"--tls-private-key-file={pki.apiserver_key}",
            f"--client-ca-file={pki.ca_crt}",
            "--authorization-mode=Node,RBAC",
            # PodSecurity is on by default; listed to make the dependency explicit.
            "--enable-admission-plugins=PodSecurity,ServiceAccount,NamespaceLifecycle,LimitRanger,ResourceQuota,OwnerReferencesPermissionEnforcement",
            f"--service-account-issuer={SA_ISSUER}",
            f"--service-account-key-file={pki.sa_pub}", f"--service-account-signing-key-file={pki.sa_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            *node_flags,
            # On SIGTERM, end open watches (their clients reconnect) instead of waiting for them
            # until the 60 s shutdown timeout: `restart kube-apiserver` takes seconds, not a minute.
            "--shutdown-watch-termination-grace-period=2s",
            "--allow-privileged=true", f"--profiling={str(profiling).lower()}", "--v=1",
        ],
        "kube-controller-manager": [
            b("kube-controller-manager"), f"--kubeconfig={kcfg('controller-manager')}",
            f"--authentication-kubeconfig={kcfg('controller-manager')}",
            f"--authorization-kubeconfig={kcfg('controller-manager')}",
            "--bind-address=127.0.0.1", f"--secure-port={ports['controller-manager']}",
            "--leader-elect=false", "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki.sa_key}", f"--root-ca-file={pki.ca_crt}",
            f"--cluster-signing-cert-file={pki.ca_crt}", f"--cluster-signing-key-file={pki.ca_key}",
            # 1,000 SFTJobs at once: the default 20 qps would dominate the benchmark.
            "--kube-api-qps=200", "--kube-api-burst=400", "--concurrent-job-syncs=20",
            "--v=1",
        ],
        "kube-scheduler": [
            b("kube-scheduler"), f"--kubeconfig={kcfg('scheduler')}",
            f"--authentication-kubeconfig={kcfg('scheduler')}", f"--authorization-kubeconfig={kcfg('scheduler')}",
            "--bind-address=127.0.0.1", f"--secure-port={ports['scheduler']}", "--leader-elect=false", "--v=1",
        ],
        "kwok": [
            b("kwok"), f"--kubeconfig={kcfg('admin')}", f"--config={KWOK_STAGES}",
            f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION[0]}={KWOK_NODE_ANNOTATION[1]}",
            "--node-lease-duration-seconds=40", "--cidr=10.128.0.0/16", "--node-ip=127.0.0.1",
            f"--server-address=127.0.0.1:{ports['kwok']}",
        ],
    }


def node_layout(info: ClusterInfo) -> realnode.NodeLayout:
    """Where the real node of ``info``'s cluster keeps its files (pure)."""
    return realnode.NodeLayout(Path(info.state_dir) / "node", Path(info.node_cache or node_cache_dir()),
                               Path(info.bin_dir))


def cluster_commands(info: ClusterInfo) -> dict[str, list[str]]:
    """The command line of every component of ``info``'s cluster: the one source for ``up`` and
    ``start`` (pure: everything it reads is in cluster.json)."""
    state_dir = Path(info.state_dir)
    cmds = component_commands(Path(info.bin_dir), state_dir, Pki(state_dir / "pki"), info.ports,
                              info.real_node, info.profiling)
    if info.real_node:
        cmds.update(realnode.component_commands(node_layout(info)))
    if info.kueue:
        cmds["kueue"] = kueue_component.command(Path(info.kueue), kueue_component.files(state_dir)["config"],
                                                Path(info.kubeconfig))
    return cmds


@dataclass(frozen=True)
class Component:
    """One process of a dev cluster, as ``stop|start|restart`` handle it."""

    name: str
    health: str  # what ``start`` waits for, in words
    needs: tuple[str, ...] = ()  # what must run for that check to pass
    on_node: bool = False  # part of the real node: its PATH, and it holds the node lock


COMPONENTS = {c.name: c for c in (
    Component("etcd", "/health"),
    Component("kube-apiserver", "/readyz", needs=("etcd",)),
    Component("kube-controller-manager", "/healthz"),
    Component("kube-scheduler", "/healthz"),
    Component("kwok", "/healthz"),
    Component("containerd", "the CRI answering", on_node=True),
    Component("kubelet", f"/healthz, a lease renewed, node {realnode.NODE_NAME} Ready and untainted, its pods known",
              needs=("kube-apiserver", "containerd"), on_node=True),
    Component("kube-proxy", "/healthz", needs=("kube-apiserver",), on_node=True),
    Component("coredns", "/ready", needs=("kube-apiserver",), on_node=True),
    Component("kueue", "/readyz", needs=("kube-apiserver",)),
)}


def component_problem(name: str, info: ClusterInfo | None, state_dir: Path) -> str | None:
    """Why ``name`` can't be stopped or started in the cluster of ``state_dir``; None if it can (pure)."""
    if name not in COMPONENTS:
        return f"unknown component {name!r}; known: {', '.join(COMPONENTS)}"
    if info is None:
        return f"no dev cluster in {state_dir} (`sftctl dev-cluster up` starts one)"
    if name in QUEUE and name not in info.components:
        return f"Kueue does not run in the cluster in {state_dir} (`up --kueue` starts one with it)"
    if name not in info.components:
        return (f"{name} is part of the real node {realnode.NODE_NAME}, which the cluster in {state_dir} "
                "doesn't have (it was started without it: `up --real-node` starts one with it)")
    return None


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

# Only used if neither crds/ nor the CRD generator is available (a partial checkout).
PLACEHOLDER_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "sftjobs.sft.dev"},
    "spec": {
        "group": "sft.dev",
        "scope": "Namespaced",
        "names": {"kind": "SFTJob", "listKind": "SFTJobList", "plural": "sftjobs", "singular": "sftjob"},
        "versions": [{
            "name": "v1alpha1", "served": True, "storage": True, "subresources": {"status": {}},
            "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
        }],
    },
}


def load_crds(crds_dir: Path) -> list[dict]:
    """Every CRD document under ``crds_dir``. Without any (an installed package has no
    crds/ folder), the SFTJob CRD from its generator; a placeholder as a last resort."""
    docs = []
    for path in sorted(crds_dir.glob("*.yaml")) if crds_dir.is_dir() else []:
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "CustomResourceDefinition"]
    if docs:
        return docs
    try:
        from sft_operator.api.crd import crd_manifest
    except ImportError:
        return [PLACEHOLDER_CRD]
    return [crd_manifest()]


# ---------------------------------------------------------------- processes


def running_components(state_dir: Path) -> dict[str, int]:
    """Component name -> pid, for the components of ``state_dir`` that are alive."""
    return running(state_dir, ALL_COMPONENTS)


def _launch(info: ClusterInfo, name: str, lock: realnode.NodeLock | None = None) -> subprocess.Popen:
    """Start one component of ``info``'s cluster, as ``up`` and ``start`` both do."""
    state_dir = Path(info.state_dir)
    cmd = cluster_commands(info)[name]
    if COMPONENTS[name].on_node:
        # Each node process inherits the node lock: it stays taken while any of them lives.
        return start(name, cmd, state_dir, realnode.component_env(node_layout(info)), pass_fds=(lock.fd,))
    return start(name, cmd, state_dir)


def _pythonpath() -> str:
    """PYTHONPATH that finds this package (and the product's) from a plain checkout too."""
    roots = [str(REPO_ROOT / d) for d in ("tools", "contract", "operator", "trainer_image")]
    return os.pathsep.join(filter(None, [*roots, os.environ.get("PYTHONPATH")]))


def _start_watchdog(state_dir: Path, owner_pid: int) -> None:
    """A detached process that runs ``down`` once ``owner_pid`` is gone."""
    code = (
        "import sys; from pathlib import Path; from sft_devcluster.cluster import watchdog; "
        f"watchdog({owner_pid}, {start_time(owner_pid)!r}, Path({str(state_dir)!r}))"
    )
    env = {k: v for k, v in os.environ.items() if k != MARKER_ENV}
    env["PYTHONPATH"] = _pythonpath()
    with open(state_dir / "components" / "watchdog.log", "ab") as log:
        subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, env=env, cwd=state_dir, start_new_session=True)


def watchdog(owner_pid: int, owner_start: str, state_dir: Path) -> None:
    # The start time guards against the owner's pid being reused by another process.
    while alive(owner_pid) and start_time(owner_pid) == owner_start:
        time.sleep(1.0)
    if running_components(state_dir):
        print(f"owner {owner_pid} exited; stopping the cluster in {state_dir}", flush=True)
        down(state_dir)


# ---------------------------------------------------------------- waiting


def _https_ok(url: str, pki: Pki | None = None) -> bool:
    ctx = ssl.create_default_context(cafile=str(pki.ca_crt)) if pki else ssl._create_unverified_context()
    if pki:
        ctx.load_cert_chain(str(pki.client_crt("admin")), str(pki.client_key("admin")))
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _node_ready(node) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in (node.status.conditions or []))


def _node_schedulable(node) -> bool:
    """Ready, and the node lifecycle controller has lifted its not-ready taint (it adds
    one to a node first seen before its Ready condition)."""
    return _node_ready(node) and not any(
        t.key.startswith("node.kubernetes.io/") for t in (node.spec.taints or []))


# ---------------------------------------------------------------- real-node objects (pure)


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


def kwok_claim(claim: str, size: str = "50Gi") -> dict:
    """Without a real node: a claim kwok's volume stage binds to a simulated volume, so the
    scheduler places the examples' (simulated) pods."""
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": STORAGE_CLASS["metadata"]["name"],
                     "resources": {"requests": {"storage": size}}}}


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


def _create_all(api, objects: list[dict]) -> None:
    from kubernetes import utils

    for obj in objects:
        utils.create_from_dict(api, obj)


# ---------------------------------------------------------------- up / down / status


def up(
    state_dir: Path | None = None,
    gpu_nodes: int = 2,
    kubeconfig_out: Path | None = None,
    crds_dir: Path | None = None,
    timeout: float = 120.0,
    stop_with_pid: int | None = None,
    real_node: bool = False,
    node_gpus: int = realnode.DEFAULT_GPUS,
    node_wait: float = 0.0,
    image_archives: list[Path] = (),
    say=print,
    profiling: bool = False,
    kueue: bool = False,
) -> ClusterInfo:
    """Start the control plane; return where it is. Stops what it started on failure.

    ``stop_with_pid``: also stop the cluster when that process exits, even if it is
    killed before it can call ``down`` (a test session hitting a timeout).
    ``real_node``: start the real node ``sft-node-0`` (one per machine; waits up to
    ``node_wait`` seconds for another cluster's node, then fails saying whose it is), advertise
    ``node_gpus`` nvidia.com/gpu on it, import ``image_archives`` into it, taint the kwok
    nodes, and create the default claims on local volumes.
    ``profiling``: serve kube-apiserver's /debug/pprof (off by default, as in a hardened cluster).
    ``kueue``: also run Kueue (``sft_devcluster.kueue``; built on first use).
    """
    state_dir = (state_dir or default_state_dir()).resolve()
    if running_components(state_dir) or list((state_dir / "pids").glob("*.pid")):
        info = ClusterInfo.load(state_dir)
        alive_now = running_components(state_dir)
        if info and set(alive_now) == set(info.components):
            if kueue and not info.kueue:
                info = kueue_component.install(state_dir, timeout=timeout, say=say)
            _copy_kubeconfig(Path(info.kubeconfig), kubeconfig_out)
            return info
        if info and alive_now:
            stopped = ", ".join(n for n in info.components if n not in alive_now)
            say(f"{stopped} stopped in {state_dir}: starting a fresh cluster "
                "(`sftctl dev-cluster start COMPONENT` brings one back instead)")
        down(state_dir)  # half-running, or left by a crash or `stop`: start clean

    bin_dir = ensure_binaries()
    started = time.monotonic()
    layout = lock = None
    if real_node:
        layout = realnode.NodeLayout(state_dir / "node", node_cache_dir(), bin_dir)
        realnode.check_prerequisites(layout)
        state_dir.mkdir(parents=True, exist_ok=True)
        lock = realnode.NodeLock.acquire(state_dir, node_wait, say)
    try:
        if layout:
            realnode.teardown(layout, state_dir)  # whatever a node that died left behind
            if realnode.leftovers(layout, state_dir):
                raise DevClusterError("a previous node left this behind and it could not be removed: "
                                      + "; ".join(realnode.leftovers(layout, state_dir)))
            lock.claim(state_dir)
            shutil.rmtree(layout.state, ignore_errors=True)  # nothing is mounted there (checked above)
            realnode.prepare_host(layout, state_dir)
        info = _up(state_dir, bin_dir, gpu_nodes=gpu_nodes, crds_dir=crds_dir, timeout=timeout,
                   stop_with_pid=stop_with_pid, layout=layout, lock=lock,
                   node_gpus=node_gpus, image_archives=image_archives, say=say, profiling=profiling)
        if kueue:
            info = kueue_component.install(state_dir, timeout=timeout, say=say)
    except BaseException:
        if lock:
            lock.release()  # our copy; down takes it again once the node's processes are gone
        down(state_dir)
        raise
    if lock:
        lock.release()
    _copy_kubeconfig(Path(info.kubeconfig), kubeconfig_out)
    info.startup_seconds = round(time.monotonic() - started, 1)
    info.save()
    return info


def _up(state_dir: Path, bin_dir: Path, *, gpu_nodes: int, crds_dir: Path | None, timeout: float,
        stop_with_pid: int | None, layout: realnode.NodeLayout | None,
        lock: realnode.NodeLock | None, node_gpus: int, image_archives: list[Path], say,
        profiling: bool = False) -> ClusterInfo:
    """``up`` from an empty state (the host prepared when ``layout`` is given)."""
    from kubernetes import client, config

    real_node = layout is not None
    # A fresh cluster each time: stale nodes and pods only confuse. Volume folders
    # (volumes/<namespace>/<claim>) stay: they hold the developer's datasets and models.
    shutil.rmtree(state_dir / "etcd", ignore_errors=True)
    for sub in ("pids", "components"):
        (state_dir / sub).mkdir(parents=True, exist_ok=True)
    pki = ensure_pki(state_dir / "pki", *((realnode.NODE_NAME, realnode.NODE_IP) if real_node else ()))

    address = realnode.NODE_IP if real_node else "127.0.0.1"
    previous = ClusterInfo.load(state_dir)
    names = ["etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok"]
    if real_node:
        names += ["kubelet", "kubelet-healthz", "kube-proxy-healthz", "kube-proxy-metrics",
                  "coredns-health", "coredns-ready"]
    ports = {k: free_port() for k in names}
    if previous and _port_free(previous.ports.get("apiserver", 0), address):
        ports["apiserver"] = previous.ports["apiserver"]  # keeps a copied kubeconfig valid
    server = f"https://{address}:{ports['apiserver']}"
    for name in ("admin", "controller-manager", "scheduler"):
        cfg = kubeconfig_dict(server, pki.ca_crt, pki.client_crt(name), pki.client_key(name), name)
        (state_dir / f"{name}.kubeconfig").write_text(yaml.safe_dump(cfg))
    kubeconfig = state_dir / "admin.kubeconfig"

    info = ClusterInfo(str(state_dir), str(kubeconfig), server, str(bin_dir), ports, gpu_nodes=gpu_nodes,
                       real_node=real_node, node_gpus=node_gpus if real_node else 0, profiling=profiling,
                       node_cache=str(layout.cache) if real_node else "")
    info.save()
    deadline = time.monotonic() + timeout
    procs: dict[str, subprocess.Popen] = {}

    def wait(what, check):
        wait_until(what, check, deadline, procs, state_dir)

    if real_node:
        pause = realnode.archive_reference(layout.images / "pause.tar")
        realnode.write_configs(layout, pki.dir, ports, pause)
        for name in ("kubelet", "kube-proxy", "coredns"):
            cfg = kubeconfig_dict(server, pki.ca_crt, pki.client_crt(name), pki.client_key(name), name)
            layout.config(f"{name}.kubeconfig").write_text(yaml.safe_dump(cfg))

    def launch(name):
        procs[name] = _launch(info, name, lock)

    if real_node:
        launch("containerd")  # meanwhile the control plane starts
    launch("etcd")
    launch("kube-apiserver")
    wait("kube-apiserver /readyz", lambda: _https_ok(f"{server}/readyz", pki))

    if stop_with_pid:
        _start_watchdog(state_dir, stop_with_pid)
    for name in ("kube-controller-manager", "kube-scheduler", "kwok"):
        launch(name)
    info.pids = {name: p.pid for name, p in procs.items()}
    info.save()

    api = config.new_client_from_config(config_file=str(kubeconfig))
    core = client.CoreV1Api(api)
    ext = client.ApiextensionsV1Api(api)
    node_names = [f"kwok-gpu-{i}" for i in range(gpu_nodes)]
    if real_node:
        _create_all(api, node_rbac())
        wait("containerd (CRI)", lambda: realnode.containerd_ready(layout))
        realnode.import_node_images(layout, sorted(layout.images.glob("*.tar")), say)
        kubelet_started = time.monotonic()
        for name in ("kubelet", "kube-proxy", "coredns"):
            launch(name)
        info.pids = {name: p.pid for name, p in procs.items()}
        info.save()
        node_names.append(realnode.NODE_NAME)
    for i in range(gpu_nodes):
        core.create_node(kwok_node(f"kwok-gpu-{i}", tainted=real_node))
    storage = client.StorageV1Api(api)
    if real_node:
        storage.create_storage_class(LOCAL_STORAGE_CLASS)
        storage.create_storage_class(_not_default(STORAGE_CLASS))  # kwok-volume, for kwok pods
    else:
        storage.create_storage_class(STORAGE_CLASS)
    crds = load_crds(crds_dir or REPO_ROOT / "crds")
    for crd in crds:
        try:
            ext.create_custom_resource_definition(crd)
        except client.ApiException as exc:
            detail = json.loads(exc.body).get("message", exc.body) if exc.body else exc.reason
            raise DevClusterError(f"the API server rejected CRD {crd['metadata']['name']}: {detail}") from None

    def crds_established() -> bool:
        for crd in crds:
            got = ext.read_custom_resource_definition(crd["metadata"]["name"])
            if not any(c.type == "Established" and c.status == "True" for c in got.status.conditions or []):
                return False
        return True

    def nodes_ready() -> bool:
        nodes = {n.metadata.name: n for n in core.list_node().items}
        return all(name in nodes and _node_schedulable(nodes[name]) for name in node_names)

    wait("CRDs Established", crds_established)
    if real_node:
        wait(f"node {realnode.NODE_NAME} registered", lambda: core.read_node(realnode.NODE_NAME))
        core.patch_node_status(realnode.NODE_NAME, realnode.gpu_capacity_patch(node_gpus))
    wait("nodes Ready and untainted", nodes_ready)
    if real_node:
        info.node_ready_seconds = round(time.monotonic() - kubelet_started, 1)
        gpu = realnode.GPU_RESOURCE
        wait(f"{gpu} allocatable on {realnode.NODE_NAME}", lambda: (
            core.read_node(realnode.NODE_NAME).status.allocatable.get(gpu) == str(node_gpus)))
        wait("kube-proxy /healthz", lambda: _http_ok(f"http://127.0.0.1:{ports['kube-proxy-healthz']}/healthz"))
        wait("CoreDNS /ready", lambda: _http_ok(f"http://127.0.0.1:{ports['coredns-ready']}/ready"))
    wait("the default ServiceAccount (controller-manager up)",
         lambda: core.read_namespaced_service_account("default", "default"))
    wait("kube-scheduler /healthz", lambda: _https_ok(f"https://127.0.0.1:{ports['scheduler']}/healthz"))
    for claim in DEFAULT_CLAIMS:
        if real_node:
            create_volume(api, state_dir, VOLUMES_NAMESPACE, claim)
        else:
            core.create_namespaced_persistent_volume_claim(VOLUMES_NAMESPACE, kwok_claim(claim))
    if real_node:
        shutil.rmtree(spare_volumes_dir(state_dir), ignore_errors=True)  # an earlier cluster's caches
        create_spare_volumes(api, state_dir, SPARE_VOLUMES)
    if real_node:
        # Product images (multi-GiB) after the deadline-bound start: imported once per change.
        # A bad archive doesn't stop the cluster; `import-image` says more.
        for archive in image_archives:
            try:
                realnode.import_node_images(layout, [archive], say)
            except DevClusterError as exc:
                say(f"image archive {archive} not imported: {exc}")
    api.close()
    return info


def _not_default(storage_class: dict) -> dict:
    meta = {**storage_class["metadata"], "annotations": {"storageclass.kubernetes.io/is-default-class": "false"}}
    return {**storage_class, "metadata": meta}


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _copy_kubeconfig(kubeconfig: Path, out: Path | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(kubeconfig.read_text())
        Path(out).chmod(0o600)


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    if not port:
        return False
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def down(state_dir: Path | None = None, timeout: float = 10.0) -> list[int]:
    """Stop every process of the cluster in ``state_dir``; return the pids that were stopped.

    One component at a time, consumers first and etcd last: an API server whose etcd is
    already gone takes far longer to shut down. Each component's whole session goes;
    SIGKILL after ``timeout`` seconds. With a real
    node: the kubelet first, then its pods through the CRI, containerd, the control plane,
    and last what the node changed on the host (``node.teardown``); fails if anything is
    left.
    """
    state_dir = (state_dir or default_state_dir()).resolve()
    info = ClusterInfo.load(state_dir)
    has_node = bool(info and info.real_node) or (state_dir / "node").is_dir()
    leaders = running_components(state_dir)
    stopped: list[int] = []

    def stop(names) -> None:
        for name in names:
            if name in leaders:
                stopped.extend(stop_session(leaders[name], timeout))

    layout = realnode.NodeLayout(state_dir / "node", node_cache_dir(), Path(info.bin_dir) if info else Path())
    stop(QUEUE)
    if has_node:
        stop(("kubelet", "kube-proxy", "coredns"))
        if "containerd" in leaders:
            realnode.stop_pods(layout)
        stop(("containerd",))
    stop(CONTROL_PLANE)
    left = session_members(set(leaders.values()))  # anything forked meanwhile
    if has_node:
        # The shims of a containerd that `stop` stopped (they hold the node lock); their
        # containers go with the rest of the node in teardown.
        left += realnode.node_processes(state_dir)
    signal_all(left, signal.SIGKILL)
    left = wait_gone(left, 5.0)
    for name in ALL_COMPONENTS:
        pidfile(state_dir, name).unlink(missing_ok=True)
    if left:
        raise DevClusterError(f"processes survived SIGKILL: {left}")
    if info and info.kueue:
        kueue_component.remove_host_files()
    if has_node:
        _node_teardown(layout, state_dir)
        shutil.rmtree(spare_volumes_dir(state_dir), ignore_errors=True)  # up made them; only caches live there
    return sorted(set(stopped))


def _node_teardown(layout: realnode.NodeLayout, state_dir: Path) -> None:
    """Undo what the node changed on the host, holding the node lock; if another cluster's
    node took the machine meanwhile, only what lies under this state dir."""
    lock = None
    for _ in range(50):  # the lock frees once the last process that inherited it exits
        lock = realnode.NodeLock.try_acquire()
        if lock:
            break
        if realnode.NodeLock.holder().get("stateDir") not in (None, str(state_dir)):
            break
        time.sleep(0.2)
    if not lock:
        holder = realnode.NodeLock.holder()
        if holder.get("stateDir") == str(state_dir):
            raise DevClusterError(f"the node lock is still held after stopping every process of {state_dir}")
        realnode.teardown_local(layout)
        return
    try:
        realnode.teardown(layout, state_dir)
        left = realnode.leftovers(layout, state_dir)
    finally:
        lock.release(clear=True)
    if left:
        raise DevClusterError("the real node left this behind: " + "; ".join(left))


def status(state_dir: Path | None = None) -> dict:
    """What runs for ``state_dir``: components with pids, kubeconfig, server, nodes."""
    state_dir = (state_dir or default_state_dir()).resolve()
    info = ClusterInfo.load(state_dir)
    alive_now = running_components(state_dir)
    expected = info.components if info else CONTROL_PLANE
    result = {
        "stateDir": str(state_dir),
        "running": bool(alive_now) and set(alive_now) == set(expected),
        "components": {name: alive_now.get(name) for name in expected},
        "kubeconfig": info.kubeconfig if info else None,
        "server": info.server if info else None,
        "realNode": bool(info and info.real_node),
        "nodes": [],
    }
    if not result["realNode"]:
        holder = realnode.NodeLock.holder() if realnode.LOCK_FILE.exists() else {}
        if holder:
            result["realNodeHolder"] = realnode.describe_holder(holder)
    if alive_now.get("kube-apiserver") and info:
        from kubernetes import client, config

        try:
            api = config.new_client_from_config(config_file=info.kubeconfig)
            nodes = client.CoreV1Api(api).list_node(_request_timeout=5).items
            result["nodes"] = [
                {"name": n.metadata.name, "ready": _node_ready(n),
                 "gpus": (n.status.allocatable or {}).get("nvidia.com/gpu", "0"),
                 "kind": "real" if n.metadata.name == realnode.NODE_NAME else "kwok"}
                for n in nodes
            ]
            api.close()
        except Exception as exc:  # noqa: BLE001 - status reports, it doesn't fail
            result["error"] = str(exc)
    return result


def import_images(state_dir: Path | None, archives: list[Path], say=None) -> list[tuple[str, str]]:
    """Import image archives into the running real node of ``state_dir`` (when missing or changed)."""
    state_dir = (state_dir or default_state_dir()).resolve()
    info = ClusterInfo.load(state_dir)
    if not info or not info.real_node or "containerd" not in running_components(state_dir):
        raise DevClusterError(f"no real node runs for {state_dir} (`sftctl dev-cluster up` starts one)")
    layout = realnode.NodeLayout(state_dir / "node", node_cache_dir(), Path(info.bin_dir))
    return realnode.import_archives(layout, archives, before_import=say and (lambda a: say(f"importing {a}")))


# ---------------------------------------------------------------- one component: stop, start, restart


@dataclass(frozen=True)
class Started:
    """A component that ``start_component`` brought back."""

    name: str
    pid: int
    seconds: float  # from starting the process until its health check passed
    not_checked: tuple[str, ...] = ()  # stopped components its health check needs: then not waited for


def _cluster_with(state_dir: Path | None, name: str) -> tuple[Path, ClusterInfo]:
    """The state dir and cluster of a component that ``stop|start|restart`` may act on."""
    state_dir = (state_dir or default_state_dir()).resolve()
    info = ClusterInfo.load(state_dir)
    problem = component_problem(name, info, state_dir)
    if problem:
        raise DevClusterError(problem)
    if not pidfile(state_dir, name).exists():  # down removes them; stop keeps them
        raise DevClusterError(f"the dev cluster in {state_dir} is down (`sftctl dev-cluster up` starts it)")
    return state_dir, info


def stop_component(state_dir: Path | None, name: str, kill: bool = False, timeout: float = 10.0) -> int | None:
    """Stop one component of a running cluster: SIGTERM, SIGKILL after ``timeout`` seconds
    (``kill``: SIGKILL at once, like a crash). Only its own process: containerd's shims and the
    pods' containers live on, as on a real node (containerd's systemd unit has KillMode=process),
    and its state stays (etcd's data, the kubelet's root, the pidfile), so ``start_component``
    brings it back as it was. Returns the pid it stopped, None if it was not running."""
    state_dir, _ = _cluster_with(state_dir, name)
    pid = running(state_dir, [name]).get(name)
    if pid is None:
        return None
    signal_all([pid], signal.SIGKILL if kill else signal.SIGTERM)
    if wait_gone([pid], 5.0 if kill else timeout):
        signal_all([pid], signal.SIGKILL)
        if wait_gone([pid], 5.0):
            raise DevClusterError(f"{name} (pid {pid}) survived SIGKILL")
    return pid


def start_component(state_dir: Path | None, name: str, timeout: float = 120.0) -> Started | None:
    """Start a stopped (or crashed) component again with the command line, configuration and
    ports ``up`` gave it, and wait up to ``timeout`` seconds until it is healthy (``COMPONENTS``
    says what that means), unless a component that check needs is stopped. None if it runs."""
    state_dir, info = _cluster_with(state_dir, name)
    if running(state_dir, [name]):
        return None
    component = COMPONENTS[name]
    lock = realnode.NodeLock.for_start(state_dir, node_layout(info)) if component.on_node else None
    since, began = time.time(), time.monotonic()
    try:
        proc = _launch(info, name, lock)
    finally:
        if lock:
            lock.release()  # ours; the process keeps its inherited copy
    info.pids[name] = proc.pid
    info.save()
    alive_now = running_components(state_dir)
    not_checked = tuple(n for n in component.needs if n not in alive_now)
    if not not_checked:
        wait_until(f"{name}: {component.health}", lambda: HEALTH_CHECKS[name](info, since),
                   began + timeout, {name: proc}, state_dir)
    return Started(name, proc.pid, round(time.monotonic() - began, 1), not_checked)


def restart_component(state_dir: Path | None, name: str, kill: bool = False, stop_timeout: float = 10.0,
                      timeout: float = 120.0) -> Started:
    """``stop_component`` then ``start_component``: back and healthy when this returns."""
    stop_component(state_dir, name, kill, stop_timeout)
    return start_component(state_dir, name, timeout)


def _etcd_healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
            return json.loads(resp.read()).get("health") == "true"
    except (OSError, ValueError):
        return False


NODE_DOWN_TAINTS = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")


def _node_back(info: ClusterInfo, since: float) -> bool:
    """A kubelet started at ``since`` (wall clock) renewed its lease, its node is Ready with no
    not-ready/unreachable taint left (after a long stop the node controller set them), and it
    knows every pod bound to it again (until then `kubectl logs` and `exec` answer NotFound)."""
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=info.kubeconfig)
    try:
        lease = client.CoordinationV1Api(api).read_namespaced_lease(realnode.NODE_NAME, "kube-node-lease",
                                                                    _request_timeout=5)
        node = client.CoreV1Api(api).read_node(realnode.NODE_NAME, _request_timeout=5)
        bound = client.CoreV1Api(api).list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={realnode.NODE_NAME}", _request_timeout=5).items
    finally:
        api.close()
    renewed = lease.spec.renew_time is not None and lease.spec.renew_time.timestamp() > since
    if not (renewed and _node_ready(node) and not any(t.key in NODE_DOWN_TAINTS for t in node.spec.taints or [])):
        return False
    expected = {(p.metadata.namespace, p.metadata.name) for p in bound
                if p.status.phase not in ("Succeeded", "Failed") and not p.metadata.deletion_timestamp}
    return expected <= _kubelet_pods(info)


def _kubelet_pods(info: ClusterInfo) -> set[tuple[str, str]]:
    """(namespace, name) of the pods the kubelet knows (its /pods API, as the admin)."""
    pki = Pki(Path(info.state_dir) / "pki")
    ctx = ssl.create_default_context(cafile=str(pki.ca_crt))
    ctx.load_cert_chain(str(pki.client_crt("admin")), str(pki.client_key("admin")))
    url = f"https://{realnode.NODE_IP}:{info.ports['kubelet']}/pods"
    with urllib.request.urlopen(url, context=ctx, timeout=5) as resp:
        return {(p["metadata"]["namespace"], p["metadata"]["name"]) for p in json.load(resp)["items"]}


def _local_ok(info: ClusterInfo, port: str, path: str) -> bool:
    return _http_ok(f"http://127.0.0.1:{info.ports[port]}{path}")


# What ``start_component`` waits for (COMPONENTS[name].health): (cluster, process start time) -> healthy.
HEALTH_CHECKS = {
    "etcd": lambda info, since: _etcd_healthy(info.ports["etcd"]),
    "kube-apiserver": lambda info, since: _https_ok(f"{info.server}/readyz", Pki(Path(info.state_dir) / "pki")),
    "kube-controller-manager": lambda info, since: _https_ok(
        f"https://127.0.0.1:{info.ports['controller-manager']}/healthz"),
    "kube-scheduler": lambda info, since: _https_ok(f"https://127.0.0.1:{info.ports['scheduler']}/healthz"),
    "kwok": lambda info, since: _local_ok(info, "kwok", "/healthz"),
    "containerd": lambda info, since: realnode.containerd_ready(node_layout(info)),
    "kubelet": lambda info, since: _local_ok(info, "kubelet-healthz", "/healthz") and _node_back(info, since),
    "kube-proxy": lambda info, since: _local_ok(info, "kube-proxy-healthz", "/healthz"),
    "coredns": lambda info, since: _local_ok(info, "coredns-ready", "/ready"),
    "kueue": lambda info, since: _local_ok(info, "kueue-health", "/readyz"),
}


PRODUCT_IMAGES = ("operator", "trainer")


def default_image_archives() -> list[Path]:
    """The product's images as scripts/build-images.sh saves them (<cache>/images/{operator,trainer}-<version>.tar)."""
    return sorted(p for name in PRODUCT_IMAGES for p in (cache_dir() / "images").glob(f"{name}-*.tar"))


# ---------------------------------------------------------------- CLI


def add_subparser(subparsers) -> None:
    """Register ``dev-cluster up|down|status|import-image|stop|start|restart`` on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "dev-cluster",
        help="local cluster for development and tests (control plane, a real node, kwok GPU nodes)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("action", choices=("up", "down", "status", "import-image", "stop", "start", "restart"))
    parser.add_argument("targets", nargs="*", metavar="ARCHIVE|COMPONENT",
                        help="import-image: image archives (podman/docker save, OCI layout tar); stop|start|restart: "
                             f"components ({', '.join(COMPONENTS)}), acted on in the order given")
    parser.add_argument("--dir", "--state-dir", dest="dir", type=Path, default=None,
                        help=f"state directory (default {default_state_dir()})")
    parser.add_argument("--gpu-nodes", type=int, default=2, help="number of kwok GPU nodes (8 GPUs each)")
    parser.add_argument("--kubeconfig-out", type=Path, default=None, help="also write the admin kubeconfig here")
    parser.add_argument("--crds", type=Path, default=None, help="directory of CRD manifests (default: the repo's crds/)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds to wait for readiness (up; start and restart: for the component's health)")
    parser.add_argument("--kill", action="store_true",
                        help="stop|restart: SIGKILL at once, like a crash (default: SIGTERM, SIGKILL after --stop-timeout)")
    parser.add_argument("--stop-timeout", type=float, default=10.0,
                        help="stop|restart: seconds from SIGTERM to SIGKILL")
    node = parser.add_mutually_exclusive_group()
    node.add_argument("--real-node", dest="real_node", action="store_true", default=None,
                      help=f"start the real node {realnode.NODE_NAME} (builds its binaries if needed; "
                           "default: start it when scripts/node-bin.sh has built them)")
    node.add_argument("--no-real-node", dest="real_node", action="store_false",
                      help="kwok nodes only (simulated pods; no root needed)")
    parser.add_argument("--kueue", action="store_true",
                        help="up: also run Kueue (built from its Go module on first use, scripts/kueue-bin.sh; "
                             "a running cluster gets it added)")
    parser.add_argument("--node-gpus", type=int, default=realnode.DEFAULT_GPUS,
                        help="nvidia.com/gpu advertised by the real node (pods then run on its CPUs)")
    parser.add_argument("--node-wait", type=float, default=0.0,
                        help="seconds to wait when another cluster's real node runs on this machine")
    parser.set_defaults(func=run_cli)


def _want_real_node(choice: bool | None) -> bool:
    if choice is not None:
        if choice:
            ensure_node_binaries()
        return choice
    if os.geteuid() != 0:
        print("real node: skipped (needs root); kwok nodes only")
        return False
    if not node_binaries_cached():
        print("real node: skipped, its binaries are not built yet: scripts/node-bin.sh "
              "(a few minutes, once), or `up --real-node`")
        return False
    ensure_node_binaries()  # quick when complete; picks up a changed recipe
    return True


def _component_cli(args) -> int:
    """``stop|start|restart COMPONENT...``: one line per component, exit 0 when each is as asked."""
    unknown = [name for name in args.targets if name not in COMPONENTS]
    if not args.targets or unknown:
        what = f"unknown component {', '.join(map(repr, unknown))}" if unknown else "name a component"
        print(f"dev-cluster {args.action}: {what}; known: {', '.join(COMPONENTS)}", file=sys.stderr)
        return 2
    for name in args.targets:
        began = time.monotonic()
        if args.action in ("stop", "restart"):
            pid = stop_component(args.dir, name, kill=args.kill, timeout=args.stop_timeout)
            how = "SIGKILL" if args.kill else "SIGTERM"
            if args.action == "stop":
                print(f"stopped {name} (pid {pid}, {how}) in {time.monotonic() - began:.1f}s" if pid
                      else f"{name} is already stopped")
                continue
        started = start_component(args.dir, name, timeout=args.timeout)
        if started is None:
            print(f"{name} is already running (pid {running_components((args.dir or default_state_dir()).resolve())[name]})")
            continue
        verb = "restarted" if args.action == "restart" else "started"
        if started.not_checked:
            print(f"{verb} {name} (pid {started.pid}); not waiting for {COMPONENTS[name].health}: "
                  f"it needs {', '.join(started.not_checked)}, stopped")
        else:
            print(f"{verb} {name} (pid {started.pid}): {COMPONENTS[name].health} after {started.seconds:.1f}s"
                  + (f", {time.monotonic() - began:.1f}s in all" if args.action == "restart" else ""))
    return 0


def run_cli(args) -> int:
    try:
        if args.action == "up":
            if status(args.dir)["running"]:
                info = up(args.dir, kubeconfig_out=args.kubeconfig_out, kueue=args.kueue)
                print(f"dev cluster already running: {info.server}")
                print(f"export KUBECONFIG={args.kubeconfig_out or info.kubeconfig}")
                return 0
            real_node = _want_real_node(args.real_node)
            info = up(args.dir, gpu_nodes=args.gpu_nodes, kubeconfig_out=args.kubeconfig_out,
                      crds_dir=args.crds, timeout=args.timeout, real_node=real_node, node_gpus=args.node_gpus, node_wait=args.node_wait,
                      image_archives=default_image_archives() if real_node else [], kueue=args.kueue)
            nodes = f"real node {realnode.NODE_NAME}, " if real_node else ""
            queue = ", Kueue" if info.kueue else ""
            print(f"dev cluster up in {info.startup_seconds}s: {info.server} ({nodes}{args.gpu_nodes} kwok GPU nodes{queue})")
            if real_node:
                print(f"kubectl get nodes shows {realnode.NODE_NAME} (Ready {info.node_ready_seconds}s after the "
                      f"kubelet started); claims {', '.join(DEFAULT_CLAIMS)} in namespace {VOLUMES_NAMESPACE} "
                      f"hold {volume_path(Path(info.state_dir), VOLUMES_NAMESPACE, '<claim>')}")
            print(f"export KUBECONFIG={args.kubeconfig_out or info.kubeconfig}")
            return 0
        if args.action == "down":
            pids = down(args.dir)
            print(f"stopped {len(pids)} processes" if pids else "nothing was running")
            return 0
        if args.action == "import-image":
            if not args.targets:
                print("dev-cluster import-image: name one or more image archives", file=sys.stderr)
                return 2
            for ref, action in import_images(args.dir, [Path(t) for t in args.targets], say=print):
                print(f"{ref}: {action}")
            return 0
        if args.action in ("stop", "start", "restart"):
            return _component_cli(args)
        st = status(args.dir)
        print(f"state dir:  {st['stateDir']}")
        print(f"kubeconfig: {st['kubeconfig']}")
        print(f"server:     {st['server']}")
        for name, pid in st["components"].items():
            print(f"  {name:<24} {'pid ' + str(pid) if pid else 'stopped'}")
        for node in st["nodes"]:
            print(f"  node {node['name']:<19} {'Ready' if node['ready'] else 'NotReady':<9} {node['kind']:<8}"
                  f"nvidia.com/gpu={node['gpus']}")
        if "realNodeHolder" in st:
            print(f"  real node: in use by {st['realNodeHolder']}")
        if "error" in st:
            print(f"  error: {st['error']}")
        return 0 if st["running"] else 1
    except DevClusterError as exc:
        print(f"dev-cluster {args.action}: {exc}", file=sys.stderr)
        return 1
