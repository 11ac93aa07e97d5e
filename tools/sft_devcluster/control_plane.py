"""The processes of a dev cluster: every component's command line (``cluster_commands``, pure, the one
source for ``up`` and ``start``), what each one is (``COMPONENTS``), and the health checks that
``start`` waits for (``HEALTH_CHECKS``)."""

from __future__ import annotations

import base64
import json
import ssl
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from . import kueue as kueue_component
from . import node as realnode
from .kwok import KWOK_NODE_ANNOTATION, KWOK_STAGES
from .pki import Pki
from .state import ClusterInfo, QUEUE, node_cache_dir

SERVICE_CIDR = realnode.SERVICE_CIDR
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"


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


def https_ok(url: str, pki: Pki | None = None) -> bool:
    ctx = ssl.create_default_context(cafile=str(pki.ca_crt)) if pki else ssl._create_unverified_context()
    if pki:
        ctx.load_cert_chain(str(pki.client_crt("admin")), str(pki.client_key("admin")))
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def node_ready(node) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in (node.status.conditions or []))


def node_schedulable(node) -> bool:
    """Ready, and the node lifecycle controller has lifted its not-ready taint (it adds
    one to a node first seen before its Ready condition)."""
    return node_ready(node) and not any(
        t.key.startswith("node.kubernetes.io/") for t in (node.spec.taints or []))


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
    if not (renewed and node_ready(node) and not any(t.key in NODE_DOWN_TAINTS for t in node.spec.taints or [])):
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
    return http_ok(f"http://127.0.0.1:{info.ports[port]}{path}")


# What ``start_component`` waits for (COMPONENTS[name].health): (cluster, process start time) -> healthy.
HEALTH_CHECKS = {
    "etcd": lambda info, since: _etcd_healthy(info.ports["etcd"]),
    "kube-apiserver": lambda info, since: https_ok(f"{info.server}/readyz", Pki(Path(info.state_dir) / "pki")),
    "kube-controller-manager": lambda info, since: https_ok(
        f"https://127.0.0.1:{info.ports['controller-manager']}/healthz"),
    "kube-scheduler": lambda info, since: https_ok(f"https://127.0.0.1:{info.ports['scheduler']}/healthz"),
    "kwok": lambda info, since: _local_ok(info, "kwok", "/healthz"),
    "containerd": lambda info, since: realnode.containerd_ready(node_layout(info)),
    "kubelet": lambda info, since: _local_ok(info, "kubelet-healthz", "/healthz") and _node_back(info, since),
    "kube-proxy": lambda info, since: _local_ok(info, "kube-proxy-healthz", "/healthz"),
    "coredns": lambda info, since: _local_ok(info, "coredns-ready", "/ready"),
    "kueue": lambda info, since: _local_ok(info, "kueue-health", "/readyz"),
}
