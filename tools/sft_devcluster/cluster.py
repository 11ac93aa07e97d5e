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

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import kueue as kueue_component
from . import node as realnode
from .control_plane import (
    COMPONENTS,
    HEALTH_CHECKS,
    cluster_commands,
    component_problem,
    http_ok,
    https_ok,
    kubeconfig_dict,
    node_layout,
    node_ready,
    node_schedulable,
)
from .kwok import STORAGE_CLASS, kwok_claim, kwok_node
from .node_objects import (
    DEFAULT_CLAIMS,
    LOCAL_STORAGE_CLASS,
    SPARE_VOLUMES,
    VOLUMES_NAMESPACE,
    create_spare_volumes,
    create_volume,
    node_rbac,
    spare_volumes_dir,
)
from .pki import ensure_pki
from .processes import (
    alive,
    DevClusterError,
    free_port,
    MARKER_ENV,
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
from .state import (
    ALL_COMPONENTS,
    CONTROL_PLANE,
    ClusterInfo,
    QUEUE,
    REPO_ROOT,
    default_state_dir,
    ensure_binaries,
    node_cache_dir,
    running_components,
)

# Only used if no crds/ folder has a CRD (a partial checkout).
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
    """Every CRD document under ``crds_dir``. Without any, the checkout's crds/ (the generated SFTJob CRD,
    kept equal to ``sftctl crd`` by tests/unit/test_crd.py; the dev tools never import the product);
    a placeholder as a last resort."""
    for folder in (crds_dir, REPO_ROOT / "crds"):
        docs = []
        for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "CustomResourceDefinition"]
        if docs:
            return docs
    return [PLACEHOLDER_CRD]


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


def _create_all(api, objects: list[dict]) -> None:
    from kubernetes import utils

    for obj in objects:
        utils.create_from_dict(api, obj)


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
    wait("kube-apiserver /readyz", lambda: https_ok(f"{server}/readyz", pki))

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
        return all(name in nodes and node_schedulable(nodes[name]) for name in node_names)

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
        wait("kube-proxy /healthz", lambda: http_ok(f"http://127.0.0.1:{ports['kube-proxy-healthz']}/healthz"))
        wait("CoreDNS /ready", lambda: http_ok(f"http://127.0.0.1:{ports['coredns-ready']}/ready"))
    wait("the default ServiceAccount (controller-manager up)",
         lambda: core.read_namespaced_service_account("default", "default"))
    wait("kube-scheduler /healthz", lambda: https_ok(f"https://127.0.0.1:{ports['scheduler']}/healthz"))
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
                {"name": n.metadata.name, "ready": node_ready(n),
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
