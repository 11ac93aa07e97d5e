"""Start, stop and inspect the local dev/test control plane (no Docker).

``up`` runs, on loopback with free ports and a state directory holding pidfiles, logs,
certificates and the admin kubeconfig:

  etcd -> kube-apiserver -> kube-controller-manager, kube-scheduler, kwok (simulated
  GPU nodes ``kwok-gpu-N``) and the process-node agent (``sft-local-0``, a dev/test tool
  that runs pods as local processes; see ``process_node``),

then creates the kwok Node objects, installs the CRDs from ``crds/`` and waits until
the API server is ready, every node is Ready, the CRDs are Established and the
service-account controller has made the ``default`` ServiceAccount.

Every process is started in its own session with ``SFT_DEVCLUSTER_DIR=<state dir>``
in its environment, so ``down`` can find and kill each component's whole session
(pods of the process node included) without confusing it with a reused pid.
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

from .pki import Pki, ensure_pki

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "k8s-bin.sh"
KWOK_STAGES = Path(__file__).with_name("kwok_stages.yaml")
PROCESS_NODE_NAME = "sft-local-0"
MARKER_ENV = "SFT_DEVCLUSTER_DIR"
SERVICE_CIDR = "10.96.0.0/16"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
# Stop order: consumers first, storage last.
COMPONENTS = ("process-node", "kwok", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd")
# kwok manages only nodes carrying this annotation, never the process node.
KWOK_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")

GPU_NODE_RESOURCES = {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": "8"}


class DevClusterError(RuntimeError):
    """The dev cluster could not be built, started or reached; the message says why."""


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
    log_path = cache_dir() / "k8s-bin.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        proc = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, stderr=log, text=True)
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise DevClusterError(f"{BUILD_SCRIPT} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return Path(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- pure builders


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    bin_dir: Path, state_dir: Path, pki: Pki, ports: dict[str, int], process_node_gpus: int = 0
) -> dict[str, list[str]]:
    """The command line of every component (pure: no I/O)."""
    b = lambda name: str(bin_dir / name)  # noqa: E731
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
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={ports['apiserver']}",
            f"--tls-cert-file={pki.apiserver_crt}", f"--tls-private-key-file={pki.apiserver_key}",
            f"--client-ca-file={pki.ca_crt}",
            "--authorization-mode=Node,RBAC",
            # PodSecurity is on by default; listed to make the dependency explicit.
            "--enable-admission-plugins=PodSecurity,ServiceAccount,NamespaceLifecycle,LimitRanger,ResourceQuota,OwnerReferencesPermissionEnforcement",
            f"--service-account-issuer={SA_ISSUER}",
            f"--service-account-key-file={pki.sa_pub}", f"--service-account-signing-key-file={pki.sa_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            # Endpoints may not hold a loopback address; the in-cluster Service isn't needed.
            "--endpoint-reconciler-type=none",
            "--allow-privileged=true", "--profiling=false", "--v=1",
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
        "process-node": [
            sys.executable, "-m", "sft_devcluster.process_node",
            f"--kubeconfig={kcfg('admin')}", f"--state-dir={state_dir}", f"--node-name={PROCESS_NODE_NAME}",
            f"--apiserver-port={ports['apiserver']}", f"--gpus={process_node_gpus}",
        ],
    }


def kwok_node(name: str) -> dict:
    """A simulated GPU node; kwok fills in conditions and keeps its lease."""
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
        "spec": {},
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
        from sft_operator.crd import crd_manifest
    except ImportError:
        return [PLACEHOLDER_CRD]
    return [crd_manifest()]


# ---------------------------------------------------------------- processes


def _read_proc(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return b""


def _is_ours(pid: int, state_dir: Path) -> bool:
    """The pid is alive and was started by this state dir (not a reused pid)."""
    marker = f"{MARKER_ENV}={state_dir}".encode()
    return marker in _read_proc(pid, "environ").split(b"\0")


def _session_members(sids: set[int]) -> list[int]:
    """Every live process whose session id is in ``sids`` (children, pods, ...)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _read_proc(int(entry), "stat").decode(errors="replace")
        # Fields after the ")" of the command name: state ppid pgrp session ...
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 3 and fields[0] != "Z" and int(fields[3]) in sids:
            members.append(int(entry))
    return members


def _pidfile(state_dir: Path, name: str) -> Path:
    return state_dir / "pids" / f"{name}.pid"


def running_components(state_dir: Path) -> dict[str, int]:
    """Component name -> pid, for the components of ``state_dir`` that are alive."""
    alive = {}
    for name in COMPONENTS:
        path = _pidfile(state_dir, name)
        if path.exists():
            pid = int(path.read_text().split()[0])
            if _is_ours(pid, state_dir):
                alive[name] = pid
    return alive


def _start(name: str, cmd: list[str], state_dir: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    log = open(state_dir / "components" / f"{name}.log", "ab")
    env = {**os.environ, MARKER_ENV: str(state_dir), **(extra_env or {})}
    # Own session: survives `up` returning, and `down` kills the session as a whole.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, cwd=state_dir, start_new_session=True)
    log.close()
    _pidfile(state_dir, name).write_text(f"{proc.pid}\n")
    return proc


def _pythonpath() -> str:
    """PYTHONPATH that finds this package (and the product's) from a plain checkout too."""
    roots = [str(REPO_ROOT / d) for d in ("tools", "operator", "trainer_image")]
    return os.pathsep.join(filter(None, [*roots, os.environ.get("PYTHONPATH")]))


def _start_time(pid: int) -> str:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks); "" if gone."""
    fields = _read_proc(pid, "stat").decode(errors="replace").rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else ""


def _start_watchdog(state_dir: Path, owner_pid: int) -> None:
    """A detached process that runs ``down`` once ``owner_pid`` is gone."""
    code = (
        "import sys; from pathlib import Path; from sft_devcluster.cluster import watchdog; "
        f"watchdog({owner_pid}, {_start_time(owner_pid)!r}, Path({str(state_dir)!r}))"
    )
    env = {k: v for k, v in os.environ.items() if k != MARKER_ENV}
    env["PYTHONPATH"] = _pythonpath()
    with open(state_dir / "components" / "watchdog.log", "ab") as log:
        subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, env=env, cwd=state_dir, start_new_session=True)


def watchdog(owner_pid: int, owner_start: str, state_dir: Path) -> None:
    # The start time guards against the owner's pid being reused by another process.
    while _alive(owner_pid) and _start_time(owner_pid) == owner_start:
        time.sleep(1.0)
    if running_components(state_dir):
        print(f"owner {owner_pid} exited; stopping the cluster in {state_dir}", flush=True)
        down(state_dir)


def _log_tail(state_dir: Path, name: str, lines: int = 25) -> str:
    path = state_dir / "components" / f"{name}.log"
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


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


def _wait(what: str, check, deadline: float, procs: dict[str, subprocess.Popen], state_dir: Path) -> None:
    while True:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - the API may be half-up; keep polling until the deadline
            pass
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise DevClusterError(
                    f"{name} exited with {proc.returncode} while waiting for {what}; "
                    f"log {state_dir / 'components' / (name + '.log')}:\n{_log_tail(state_dir, name)}"
                )
        if time.monotonic() > deadline:
            raise DevClusterError(f"timed out waiting for {what}; logs in {state_dir / 'components'}")
        time.sleep(0.2)


def _node_ready(node) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in (node.status.conditions or []))


def _node_schedulable(node) -> bool:
    """Ready, and the node lifecycle controller has lifted its not-ready taint (it adds
    one to a node first seen before its Ready condition)."""
    return _node_ready(node) and not any(
        t.key.startswith("node.kubernetes.io/") for t in (node.spec.taints or []))


# ---------------------------------------------------------------- up / down / status


def up(
    state_dir: Path | None = None,
    gpu_nodes: int = 2,
    kubeconfig_out: Path | None = None,
    crds_dir: Path | None = None,
    timeout: float = 120.0,
    process_node_gpus: int = 0,
    stop_with_pid: int | None = None,
) -> ClusterInfo:
    """Start the control plane; return where it is. Stops what it started on failure.

    ``stop_with_pid``: also stop the cluster when that process exits, even if it is
    killed before it can call ``down`` (a test session hitting a timeout).
    """
    from kubernetes import client, config

    state_dir = (state_dir or default_state_dir()).resolve()
    if running_components(state_dir):
        info = ClusterInfo.load(state_dir)
        if info and set(running_components(state_dir)) == set(COMPONENTS):
            _copy_kubeconfig(Path(info.kubeconfig), kubeconfig_out)
            return info
        down(state_dir)  # half-running: start clean

    bin_dir = ensure_binaries()
    started = time.monotonic()
    # A fresh cluster each time: stale nodes, pods and their logs only confuse. PVC
    # folders (pvc/<claim>) stay: they hold the developer's datasets and models.
    for stale in ("etcd", "pods", "logs"):
        shutil.rmtree(state_dir / stale, ignore_errors=True)
    for sub in ("pids", "components", "logs", "pvc"):
        (state_dir / sub).mkdir(parents=True, exist_ok=True)
    pki = ensure_pki(state_dir / "pki")

    previous = ClusterInfo.load(state_dir)
    ports = {k: free_port() for k in ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok")}
    if previous and _port_free(previous.ports.get("apiserver", 0)):
        ports["apiserver"] = previous.ports["apiserver"]  # keeps a copied kubeconfig valid
    server = f"https://127.0.0.1:{ports['apiserver']}"
    for name in ("admin", "controller-manager", "scheduler"):
        cfg = kubeconfig_dict(server, pki.ca_crt, pki.client_crt(name), pki.client_key(name), name)
        (state_dir / f"{name}.kubeconfig").write_text(yaml.safe_dump(cfg))
    kubeconfig = state_dir / "admin.kubeconfig"

    info = ClusterInfo(str(state_dir), str(kubeconfig), server, str(bin_dir), ports, gpu_nodes=gpu_nodes)
    info.save()
    cmds = component_commands(bin_dir, state_dir, pki, ports, process_node_gpus)
    deadline = time.monotonic() + timeout
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["etcd"] = _start("etcd", cmds["etcd"], state_dir)
        procs["kube-apiserver"] = _start("kube-apiserver", cmds["kube-apiserver"], state_dir)
        _wait("kube-apiserver /readyz", lambda: _https_ok(f"{server}/readyz", pki), deadline, procs, state_dir)

        if stop_with_pid:
            _start_watchdog(state_dir, stop_with_pid)
        for name in ("kube-controller-manager", "kube-scheduler", "kwok"):
            procs[name] = _start(name, cmds[name], state_dir)
        procs["process-node"] = _start("process-node", cmds["process-node"], state_dir, {"PYTHONPATH": _pythonpath()})
        info.pids = {name: p.pid for name, p in procs.items()}
        info.save()

        api = config.new_client_from_config(config_file=str(kubeconfig))
        core = client.CoreV1Api(api)
        ext = client.ApiextensionsV1Api(api)
        for i in range(gpu_nodes):
            core.create_node(kwok_node(f"kwok-gpu-{i}"))
        client.StorageV1Api(api).create_storage_class(STORAGE_CLASS)
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
            want = [f"kwok-gpu-{i}" for i in range(gpu_nodes)] + [PROCESS_NODE_NAME]
            return all(name in nodes and _node_schedulable(nodes[name]) for name in want)

        _wait("CRDs Established", crds_established, deadline, procs, state_dir)
        _wait("nodes Ready and untainted", nodes_ready, deadline, procs, state_dir)
        _wait("the default ServiceAccount (controller-manager up)",
              lambda: core.read_namespaced_service_account("default", "default"), deadline, procs, state_dir)
        _wait("kube-scheduler /healthz",
              lambda: _https_ok(f"https://127.0.0.1:{ports['scheduler']}/healthz"), deadline, procs, state_dir)
        api.close()
    except BaseException:
        down(state_dir)
        raise

    _copy_kubeconfig(kubeconfig, kubeconfig_out)
    info.startup_seconds = round(time.monotonic() - started, 1)
    info.save()
    return info


def _copy_kubeconfig(kubeconfig: Path, out: Path | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(kubeconfig.read_text())
        Path(out).chmod(0o600)


def _port_free(port: int) -> bool:
    if not port:
        return False
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def down(state_dir: Path | None = None, timeout: float = 10.0) -> list[int]:
    """Stop every process of the cluster in ``state_dir``; return the pids that were stopped.

    One component at a time, consumers first and etcd last: an API server whose etcd is
    already gone takes far longer to shut down. Each component's whole session goes
    (the process node's pods included); SIGKILL after ``timeout`` seconds.
    """
    state_dir = (state_dir or default_state_dir()).resolve()
    leaders = running_components(state_dir)
    stopped: list[int] = []
    for name in COMPONENTS:
        if name not in leaders:
            continue
        members = _session_members({leaders[name]})
        _signal_all(members, signal.SIGTERM)
        left = _wait_gone(members, timeout)
        _signal_all(left, signal.SIGKILL)
        _wait_gone(left, 5.0)
        stopped += members
    left = _session_members(set(leaders.values()))  # anything forked meanwhile
    _signal_all(left, signal.SIGKILL)
    left = _wait_gone(left, 5.0)
    for name in COMPONENTS:
        _pidfile(state_dir, name).unlink(missing_ok=True)
    if left:
        raise DevClusterError(f"processes survived SIGKILL: {left}")
    return sorted(set(stopped))


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    stat = _read_proc(pid, "stat").decode(errors="replace")
    return bool(stat) and stat.rpartition(")")[2].split()[0] != "Z"


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if _alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def status(state_dir: Path | None = None) -> dict:
    """What runs for ``state_dir``: components with pids, kubeconfig, server, nodes."""
    state_dir = (state_dir or default_state_dir()).resolve()
    info = ClusterInfo.load(state_dir)
    alive = running_components(state_dir)
    result = {
        "stateDir": str(state_dir),
        "running": bool(alive) and set(alive) == set(COMPONENTS),
        "components": {name: alive.get(name) for name in COMPONENTS},
        "kubeconfig": info.kubeconfig if info else None,
        "server": info.server if info else None,
        "nodes": [],
    }
    if alive.get("kube-apiserver") and info:
        from kubernetes import client, config

        try:
            api = config.new_client_from_config(config_file=info.kubeconfig)
            nodes = client.CoreV1Api(api).list_node(_request_timeout=5).items
            result["nodes"] = [
                {"name": n.metadata.name, "ready": _node_ready(n),
                 "gpus": (n.status.allocatable or {}).get("nvidia.com/gpu", "0")}
                for n in nodes
            ]
            api.close()
        except Exception as exc:  # noqa: BLE001 - status reports, it doesn't fail
            result["error"] = str(exc)
    return result


# ---------------------------------------------------------------- CLI


def add_subparser(subparsers) -> None:
    """Register ``dev-cluster up|down|status`` on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "dev-cluster",
        help="local control plane for development and tests (etcd, kube-apiserver, kwok GPU nodes)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("action", choices=("up", "down", "status"))
    parser.add_argument("--dir", type=Path, default=None, help=f"state directory (default {default_state_dir()})")
    parser.add_argument("--gpu-nodes", type=int, default=2, help="number of kwok GPU nodes (8 GPUs each)")
    parser.add_argument("--kubeconfig-out", type=Path, default=None, help="also write the admin kubeconfig here")
    parser.add_argument("--crds", type=Path, default=None, help="directory of CRD manifests (default: the repo's crds/)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for readiness")
    parser.add_argument("--process-node-gpus", type=int, default=0,
                        help="nvidia.com/gpu advertised by the process node sft-local-0 (the host's GPUs)")
    parser.set_defaults(func=run_cli)


def run_cli(args) -> int:
    try:
        if args.action == "up":
            if status(args.dir)["running"]:
                info = up(args.dir, kubeconfig_out=args.kubeconfig_out)
                print(f"dev cluster already running: {info.server}")
                print(f"export KUBECONFIG={args.kubeconfig_out or info.kubeconfig}")
                return 0
            info = up(args.dir, gpu_nodes=args.gpu_nodes, kubeconfig_out=args.kubeconfig_out,
                      crds_dir=args.crds, timeout=args.timeout, process_node_gpus=args.process_node_gpus)
            print(f"dev cluster up in {info.startup_seconds}s: {info.server}")
            print(f"export KUBECONFIG={args.kubeconfig_out or info.kubeconfig}")
            return 0
        if args.action == "down":
            pids = down(args.dir)
            print(f"stopped {len(pids)} processes" if pids else "nothing was running")
            return 0
        st = status(args.dir)
        print(f"state dir:  {st['stateDir']}")
        print(f"kubeconfig: {st['kubeconfig']}")
        print(f"server:     {st['server']}")
        for name, pid in st["components"].items():
            print(f"  {name:<24} {'pid ' + str(pid) if pid else 'not running'}")
        for node in st["nodes"]:
            print(f"  node {node['name']:<19} {'Ready' if node['ready'] else 'NotReady'}  nvidia.com/gpu={node['gpus']}")
        if "error" in st:
            print(f"  error: {st['error']}")
        return 0 if st["running"] else 1
    except DevClusterError as exc:
        print(f"dev-cluster {args.action}: {exc}", file=sys.stderr)
        return 1
