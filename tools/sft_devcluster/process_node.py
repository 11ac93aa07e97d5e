"""DEV/TEST TOOL: a process-backed Kubernetes node (``sft-local-0``).

This is a development and test tool of the dev cluster, not a product feature and not a
kubelet. It lets an SFTJob's pod run the real trainer inside the real control-plane
flow (scheduler, Job controller, pod status) on a machine without Docker.

The agent registers a Node (label ``sft.dev/process-node=true``, taint
``sft.dev/process-node=true:NoSchedule`` so only pods that tolerate it land here), keeps
it Ready (node status + Lease heartbeats), watches the pods bound to it and runs each
container's ``command`` + ``args`` unmodified as a local process:

- env: the pod's ``env``/``envFrom`` (values, fieldRef, resourceFieldRef,
  secretKeyRef, configMapKeyRef read from the API) with kubelet ``$(VAR)`` expansion,
  plus PATH/HOME from the host and KUBERNETES_SERVICE_HOST/PORT of the API server;
- volumes bind-mounted at their container paths in a private mount namespace
  (``unshare --mount --propagation private``): emptyDir and configMap/secret/downwardAPI
  (temp dirs), PVCs (host folder ``<state-dir>/pvc/<claimName>``), hostPath, projected
  volumes with serviceAccountToken (requested through TokenRequest for the pod's
  service account, audience and expiry, bound to the pod, refreshed at 80% of its life);
- the container's terminationMessagePath (default /dev/termination-log) is a bound temp
  file whose content becomes the termination message.

It reports phase, conditions, container states, exit codes, reasons and messages via
``pods/status``, kills the process group when a pod is deleted, and writes each pod's
output to ``<state-dir>/logs/<namespace>_<pod>.log``.

Limits, on purpose: processes run as root with the host's network, PID space and
filesystem (only the mount points differ); securityContext, resources, probes, images
and restartPolicy other than Never are ignored (containers are never restarted); a
container needs an explicit ``command`` (there is no image entrypoint). Mount points
that don't exist on the host are created there (empty directories/files).
"""

from __future__ import annotations

import argparse
import base64
import logging
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger("sft-process-node")

NODE_LABEL = "sft.dev/process-node"
POD_IP = "127.0.0.1"
TERMINATION_MESSAGE_LIMIT = 4096
TOKEN_REFRESH_FRACTION = 0.8  # kubelet refreshes projected tokens at 80% of their life
HEARTBEAT_SECONDS = 10
LEASE_SECONDS = 40


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------ pure helpers

_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubelet's ``$(VAR)`` expansion: defined names are replaced, ``$$`` escapes a
    ``$``, undefined references stay as they are."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR_REF.sub(sub, text)


_KEYED_FIELD = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def field_ref(pod: dict, path: str) -> str:
    """The value of a downward-API ``fieldRef.fieldPath`` for this pod."""
    meta, spec = pod["metadata"], pod["spec"]
    keyed = _KEYED_FIELD.match(path)
    if keyed:
        return (meta.get(keyed.group(1)) or {}).get(keyed.group(2), "")
    if path in ("metadata.labels", "metadata.annotations"):
        items = sorted((meta.get(path.split(".")[1]) or {}).items())
        return "\n".join(f'{k}="{v}"' for k, v in items)
    simple = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"],
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
        "status.hostIP": POD_IP,
        "status.hostIPs": POD_IP,
        "status.podIP": POD_IP,
        "status.podIPs": POD_IP,
    }
    if path not in simple:
        raise PodSetupError("CreateContainerConfigError", f"unsupported fieldRef {path!r}")
    return simple[path]


def resource_field_ref(container: dict, ref: dict, node_allocatable: dict[str, str]) -> str:
    """``resourceFieldRef``: the limit (else the node's allocatable) or request, in
    units of the divisor, rounded up like the kubelet does."""
    from kubernetes.utils import parse_quantity

    kind, _, resource = ref["resource"].partition(".")
    resources = container.get("resources") or {}
    value = (resources.get(kind) or {}).get(resource)
    if value is None:
        value = node_allocatable.get(resource, "0") if kind == "limits" else "0"
    divisor = parse_quantity(ref.get("divisor") or "1")
    return str(math.ceil(parse_quantity(value) / divisor))


def kubernetes_env(apiserver_port: int) -> dict[str, str]:
    """What in-cluster clients read to find the API server (kubelet injects these)."""
    return {
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(apiserver_port),
        "KUBERNETES_SERVICE_PORT_HTTPS": str(apiserver_port),
        "KUBERNETES_PORT": f"tcp://127.0.0.1:{apiserver_port}",
    }


def exit_code_of(returncode: int) -> int:
    """Popen reports death by signal N as -N; containers report 128+N."""
    return 128 - returncode if returncode < 0 else returncode


def image_paths() -> list[str]:
    """What a container image would hold, which on this node is the host: the Python
    environment and the project's own packages (an editable install lives in the checkout)."""
    import sysconfig

    import sft_operator
    import sft_trainer

    paths = {sys.prefix, sys.base_prefix, *sysconfig.get_paths().values()}
    paths |= {str(Path(pkg.__file__).resolve().parent.parent) for pkg in (sft_operator, sft_trainer)}
    return sorted(p for p in paths if p and Path(p).exists())


def keep_visible(targets: list[str], paths: list[str]) -> list[tuple[str, str, bool]]:
    """Read-only binds that put back image paths a pod mount would hide (an emptyDir at /tmp
    over a checkout in /tmp). A pod that mounts exactly at such a path still wins."""

    def hidden(path: Path) -> bool:
        return any(Path(t) in path.parents for t in targets) and str(path) not in targets

    return [(p, p, True) for p in paths if hidden(Path(p))]


def stage_root(targets: list[str], uid: str, pod_dir: Path) -> Path:
    """A directory for staging the mount sources that none of the pod's mount targets
    covers (a pod that mounts an emptyDir at /tmp must still see sources under /tmp)."""

    def covered(path: Path) -> bool:
        return any(path == Path(t) or Path(t) in path.parents for t in targets)

    for candidate in (Path("/run/sft-process-node") / uid, pod_dir / "stage", Path("/") / f".sft-stage-{uid}"):
        if not covered(candidate):
            return candidate
    raise PodSetupError("CreateContainerConfigError", "the pod's mounts cover every staging directory")


def mount_script(mounts: list[tuple[str, str, bool]], workdir: str, stage: Path) -> str:
    """A POSIX sh script, run inside ``unshare --mount``, that bind-mounts the
    (source, target, read_only) triples, enters the working directory and execs its
    arguments. Every source is first bound under ``stage`` so that a target mounted
    earlier (say /tmp) can't hide a later source."""
    lines = [
        "set -eu",
        "stage() {",
        '  if [ -d "$1" ]; then mkdir -p "$2"; else : > "$2"; fi',
        '  mount --bind "$1" "$2"',
        "}",
        "mnt() {",
        '  if [ -d "$1" ]; then mkdir -p "$2"; else mkdir -p "$(dirname "$2")"; [ -e "$2" ] || : > "$2"; fi',
        '  mount --bind "$1" "$2"',
        '  if [ "$3" = ro ]; then mount -o remount,bind,ro "$2"; fi',
        "}",
        f"mkdir -p {shlex.quote(str(stage))}",
    ]
    for i, (source, _, _) in enumerate(mounts):
        lines.append(f"stage {shlex.quote(source)} {shlex.quote(str(stage / str(i)))}")
    for i, (_, target, read_only) in enumerate(mounts):
        lines.append(f"mnt {shlex.quote(str(stage / str(i)))} {shlex.quote(target)} {'ro' if read_only else 'rw'}")
    lines += [f"mkdir -p {shlex.quote(workdir)}", f"cd {shlex.quote(workdir)}", 'exec "$@"']
    return "\n".join(lines) + "\n"


def remove_stage(stage: Path) -> None:
    """Remove the empty mount points left on the host. Never recursive: should a mount
    still be live, this must not delete through it."""
    if not stage.is_dir():
        return
    for entry in stage.iterdir():
        try:
            entry.rmdir() if entry.is_dir() else (entry.stat().st_size == 0 and entry.unlink())
        except OSError:
            pass
    try:
        stage.rmdir()
    except OSError:
        pass


def container_status(container: dict, state: ContainerState) -> dict:
    status = {
        "name": container["name"],
        "image": container.get("image", ""),
        "imageID": "",
        "ready": state.kind == "running",
        "started": state.kind == "running",
        "restartCount": 0,
        "state": {},
    }
    if state.pid:
        status["containerID"] = f"sft-process://{state.pid}"
    if state.kind == "waiting":
        status["state"]["waiting"] = {"reason": state.reason, "message": state.message or None}
    elif state.kind == "running":
        status["state"]["running"] = {"startedAt": state.started_at}
    else:
        status["state"]["terminated"] = {
            "exitCode": state.exit_code,
            "reason": state.reason,
            "message": state.message or None,
            "startedAt": state.started_at,
            "finishedAt": state.finished_at,
            "containerID": status.get("containerID"),
        }
    return status


def pod_conditions(phase: str, initialized: bool, ready: bool) -> list[dict]:
    t = now()
    reason = {"Succeeded": "PodCompleted", "Failed": "PodFailed"}.get(phase)

    def cond(kind: str, ok: bool, why: str | None = None) -> dict:
        c = {"type": kind, "status": "True" if ok else "False", "lastTransitionTime": t}
        if why and not ok:
            c["reason"] = why
        return c

    return [
        cond("PodScheduled", True),
        cond("PodReadyToStartContainers", phase != "Pending" or initialized),
        cond("Initialized", initialized, reason),
        cond("ContainersReady", ready, reason or "ContainersNotReady"),
        cond("Ready", ready, reason or "ContainersNotReady"),
    ]


# ------------------------------------------------------------------ pod runner


class PodSetupError(Exception):
    """The pod can't start yet (missing ConfigMap, Secret, ...): retried like the kubelet."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class ContainerState:
    kind: str = "waiting"  # waiting | running | terminated
    reason: str = "ContainerCreating"
    message: str = ""
    pid: int | None = None
    exit_code: int | None = None
    started_at: str | None = None
    finished_at: str | None = None


@dataclass
class ProjectedToken:
    path: Path
    service_account: str
    audience: str
    expiration_seconds: int
    written_at: float = 0.0


@dataclass
class PodRunner:
    """Runs one pod: volumes, init containers in order, then the containers together."""

    agent: Agent
    pod: dict
    tokens: list[ProjectedToken] = field(default_factory=list)
    kill_requested: threading.Event = field(default_factory=threading.Event)
    grace_seconds: float = 30.0
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    stages: list[Path] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.pod['metadata']['namespace']}/{self.pod['metadata']['name']}"

    @property
    def pod_dir(self) -> Path:
        meta = self.pod["metadata"]
        return self.agent.state_dir / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"

    @property
    def log_path(self) -> Path:
        meta = self.pod["metadata"]
        return self.agent.state_dir / "logs" / f"{meta['namespace']}_{meta['name']}.log"

    def request_kill(self, grace: float) -> None:
        self.grace_seconds = min(grace, 30.0)
        self.kill_requested.set()

    # -- status

    def report(self, phase: str, states: dict[str, ContainerState], init_states: dict[str, ContainerState],
               initialized: bool, message: str | None = None, reason: str | None = None) -> None:
        spec = self.pod["spec"]
        ready = phase == "Running" and all(s.kind == "running" for s in states.values())
        status = {
            "phase": phase,
            "conditions": pod_conditions(phase, initialized, ready),
            "hostIP": POD_IP,
            "hostIPs": [{"ip": POD_IP}],
            "podIP": POD_IP,
            "podIPs": [{"ip": POD_IP}],
            "startTime": self.agent.start_times.setdefault(self.pod["metadata"]["uid"], now()),
            "containerStatuses": [container_status(c, states[c["name"]]) for c in spec["containers"]],
            "message": message,
            "reason": reason,
        }
        if spec.get("initContainers"):
            status["initContainerStatuses"] = [
                container_status(c, init_states[c["name"]]) for c in spec["initContainers"]
            ]
        self.agent.patch_pod_status(self.pod, status)

    # -- setup

    def prepare(self) -> tuple[dict[str, list[tuple[str, str, bool]]], dict[str, dict[str, str]]]:
        """Materialise volumes; return the mounts and the env of every container."""
        volumes_dir = self.pod_dir / "volumes"
        volumes_dir.mkdir(parents=True, exist_ok=True)
        sources = {v["name"]: self.agent.materialise_volume(self, v, volumes_dir) for v in self.pod["spec"].get("volumes") or []}
        mounts: dict[str, list[tuple[str, str, bool]]] = {}
        envs: dict[str, dict[str, str]] = {}
        for c in (self.pod["spec"].get("initContainers") or []) + self.pod["spec"]["containers"]:
            envs[c["name"]] = self.agent.container_env(self.pod, c)
            own = []
            for m in c.get("volumeMounts") or []:
                if m["name"] not in sources:
                    raise PodSetupError("CreateContainerConfigError", f"volume {m['name']!r} is not defined")
                source = Path(sources[m["name"]])
                sub = m.get("subPath") or expand(m.get("subPathExpr") or "", envs[c["name"]])
                if sub:
                    source = source / sub
                    if not source.exists():
                        source.mkdir(parents=True)  # the kubelet creates missing subPaths as directories
                own.append((str(source), m["mountPath"], bool(m.get("readOnly"))))
            term = self.pod_dir / f"termination-{c['name']}"
            term.write_text("")
            own.append((str(term), c.get("terminationMessagePath") or "/dev/termination-log", False))
            own += keep_visible([target for _, target, _ in own], image_paths())
            # Parents before children, so a mount at /a/b isn't hidden by a later one at /a.
            mounts[c["name"]] = sorted(own, key=lambda m: len(Path(m[1]).parts))
        return mounts, envs

    def start(self, container: dict, mounts: list[tuple[str, str, bool]], env: dict[str, str], log_file) -> subprocess.Popen:
        command = [expand(x, env) for x in container.get("command") or []]
        args = [expand(x, env) for x in container.get("args") or []]
        if not command:
            raise PodSetupError("ContainerCannotRun", "the process node needs an explicit command (it has no image entrypoint)")
        script = self.pod_dir / f"start-{container['name']}.sh"
        uid = self.pod["metadata"]["uid"]
        stage = stage_root([t for _, t, _ in mounts], f"{uid}-{container['name']}", self.pod_dir)
        self.stages.append(stage)
        # Like a container without WORKDIR, the process starts in "/".
        script.write_text(mount_script(mounts, container.get("workingDir") or "/", stage))
        log.info("pod %s: starting container %s: %s", self.name, container["name"], shlex.join(command + args))
        # Private mount namespace: binds are visible to this pod only; its own process
        # group so that a deletion signals the whole tree.
        return subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", str(script), *command, *args],
            env=env, cwd="/", stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            process_group=0,
        )

    def termination_message(self, container: dict, exit_code: int) -> str:
        text = (self.pod_dir / f"termination-{container['name']}").read_bytes()[:TERMINATION_MESSAGE_LIMIT]
        message = text.decode(errors="replace").strip()
        if not message and exit_code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            lines = self.log_path.read_text(errors="replace").splitlines()[-80:]
            message = "\n".join(lines)[-2048:]
        return message

    # -- lifecycle

    def run(self) -> None:
        spec = self.pod["spec"]
        states = {c["name"]: ContainerState() for c in spec["containers"]}
        init_states = {c["name"]: ContainerState(reason="PodInitializing") for c in spec.get("initContainers") or []}
        try:
            mounts, envs = self.setup_with_retries(states, init_states)
            if mounts is None:
                return self.finish_deleted(states, init_states)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "ab") as log_file:
                for c in spec.get("initContainers") or []:
                    self.run_containers([c], init_states, mounts, envs, log_file, lambda: self.report("Pending", states, init_states, False))
                    if init_states[c["name"]].exit_code != 0 or self.kill_requested.is_set():
                        return self.finish(states, init_states, "Failed")
                self.run_containers(spec["containers"], states, mounts, envs, log_file, lambda: self.report("Running", states, init_states, True))
            phase = "Succeeded" if all(s.exit_code == 0 for s in states.values()) else "Failed"
            self.finish(states, init_states, phase)
        except Exception as exc:  # noqa: BLE001 - anything unexpected fails the pod visibly
            log.exception("pod %s failed in the agent", self.name)
            for s in states.values():
                if s.kind != "terminated":
                    s.kind, s.reason, s.message, s.exit_code = "terminated", "StartError", str(exc), 128
                    s.started_at = s.started_at or now()
                    s.finished_at = now()
            self.finish(states, init_states, "Failed", message=str(exc))
        finally:
            for stage in self.stages:
                remove_stage(stage)
            self.agent.runner_done(self)

    def setup_with_retries(self, states, init_states):
        """Volumes and env, retried every 2 s (as ContainerCreating) until they resolve
        or the pod is deleted; returns (None, None) on deletion."""
        last_error = None
        while not self.kill_requested.is_set():
            try:
                return self.prepare()
            except PodSetupError as exc:
                if str(exc) != last_error:
                    log.info("pod %s waiting: %s", self.name, exc)
                    for s in list(states.values()) + list(init_states.values()):
                        s.reason, s.message = exc.reason, exc.message
                    self.report("Pending", states, init_states, False)
                    last_error = str(exc)
                self.kill_requested.wait(2.0)
        return None, None

    def run_containers(self, containers, states, mounts, envs, log_file, report_running) -> None:
        for c in containers:
            st = states[c["name"]]
            try:
                proc = self.start(c, mounts[c["name"]], envs[c["name"]], log_file)
            except PodSetupError as exc:
                st.kind, st.reason, st.message, st.exit_code = "terminated", exc.reason, exc.message, 128
                st.started_at = st.finished_at = now()
                continue
            self.procs[c["name"]] = proc
            st.kind, st.pid, st.started_at, st.reason, st.message = "running", proc.pid, now(), "", ""
        if any(s.kind == "running" for s in states.values()):
            report_running()
        self.wait(containers, states)

    def wait(self, containers, states) -> None:
        by_name = {c["name"]: c for c in containers}
        pending = {name: p for name, p in self.procs.items() if name in by_name and states[name].kind == "running"}
        kill_deadline = None
        while pending:
            for name, proc in list(pending.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                # Like a container's cgroup: what the main process left running goes too.
                self.signal([proc], signal.SIGKILL)
                code = exit_code_of(rc)
                st = states[name]
                st.kind, st.exit_code, st.finished_at = "terminated", code, now()
                st.reason = "Completed" if code == 0 else "Error"
                st.message = self.termination_message(by_name[name], code)
                del pending[name]
            if self.kill_requested.is_set() and pending:
                if kill_deadline is None:
                    kill_deadline = time.monotonic() + self.grace_seconds
                    self.signal(pending.values(), signal.SIGTERM)
                elif time.monotonic() > kill_deadline:
                    self.signal(pending.values(), signal.SIGKILL)
            self.agent.refresh_tokens(self)
            time.sleep(0.1)

    @staticmethod
    def signal(procs, sig) -> None:
        for proc in procs:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass

    def finish(self, states, init_states, phase: str, message: str | None = None) -> None:
        # Containers that never started (an init container failed) stay "waiting", as with the kubelet.
        self.report(phase, states, init_states, all(s.exit_code == 0 for s in init_states.values()), message=message)
        if self.kill_requested.is_set():
            self.agent.delete_pod_now(self.pod)

    def finish_deleted(self, states, init_states) -> None:
        self.finish(states, init_states, "Failed", message="deleted before its containers started")


# ------------------------------------------------------------------ the agent


class Agent:
    def __init__(self, api_client, node_name: str, state_dir: Path, apiserver_port: int,
                 capacity: dict[str, str]):
        from kubernetes import client

        self.api = api_client
        self.core = client.CoreV1Api(api_client)
        self.coordination = client.CoordinationV1Api(api_client)
        self.node_name = node_name
        self.state_dir = state_dir
        self.apiserver_port = apiserver_port
        self.capacity = capacity
        self.runners: dict[str, PodRunner] = {}
        self.finished: dict[str, float] = {}  # uid -> when; ignore stale events for them
        self.start_times: dict[str, str] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()

    # -- node

    def node_manifest(self) -> dict:
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node_name,
                "labels": {
                    NODE_LABEL: "true",
                    "kubernetes.io/hostname": self.node_name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                },
                "annotations": {"sft.dev/dev-test-tool": "process-backed node: runs pods as local processes"},
            },
            "spec": {"taints": [{"key": NODE_LABEL, "value": "true", "effect": "NoSchedule"}]},
        }

    def node_status(self) -> dict:
        t = now()

        def cond(kind: str, status: str, reason: str, message: str) -> dict:
            return {"type": kind, "status": status, "reason": reason, "message": message,
                    "lastHeartbeatTime": t, "lastTransitionTime": self.node_started}

        conditions = [
            cond("Ready", "True", "KubeletReady", "sft process-node agent (dev/test tool) is posting ready status"),
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "not measured"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "not measured"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "not measured"),
        ]
        return {
            "capacity": self.capacity,
            "allocatable": self.capacity,
            "conditions": conditions,
            "addresses": [{"type": "InternalIP", "address": POD_IP}, {"type": "Hostname", "address": self.node_name}],
            "nodeInfo": {
                "architecture": "amd64", "operatingSystem": "linux", "osImage": "sft process node (dev/test tool)",
                "kernelVersion": os.uname().release, "containerRuntimeVersion": "sft-process://0",
                "kubeletVersion": "sft-process-node", "kubeProxyVersion": "", "bootID": "", "machineID": "",
                "systemUUID": "",
            },
        }

    def register(self) -> None:
        from kubernetes.client.exceptions import ApiException

        self.node_started = now()
        try:
            # Status in the create (as the kubelet does), so the node is never seen
            # without a Ready condition and tainted not-ready for it.
            self.core.create_node({**self.node_manifest(), "status": self.node_status()})
        except ApiException as exc:
            if exc.status != 409:
                raise
            self.core.patch_node(self.node_name, self.node_manifest())
        self.core.patch_node_status(self.node_name, {"status": self.node_status()})
        self.renew_lease()
        log.info("registered node %s", self.node_name)

    def renew_lease(self) -> None:
        from kubernetes.client.exceptions import ApiException

        body = {
            "metadata": {"name": self.node_name, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": self.node_name, "leaseDurationSeconds": LEASE_SECONDS,
                     "renewTime": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")},
        }
        try:
            self.coordination.patch_namespaced_lease(self.node_name, "kube-node-lease", body)
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.coordination.create_namespaced_lease("kube-node-lease", body)

    def heartbeat_loop(self) -> None:
        while not self.stop.wait(HEARTBEAT_SECONDS):
            try:
                self.renew_lease()
                self.core.patch_node_status(self.node_name, {"status": {"conditions": self.node_status()["conditions"]}})
            except Exception:  # noqa: BLE001 - keep beating through API hiccups
                log.exception("heartbeat failed")

    # -- API helpers used by runners

    def patch_pod_status(self, pod: dict, status: dict) -> None:
        from kubernetes.client.exceptions import ApiException

        meta = pod["metadata"]
        for attempt in range(5):
            try:
                self.core.patch_namespaced_pod_status(meta["name"], meta["namespace"], {"status": status})
                return
            except ApiException as exc:
                if exc.status == 404:
                    return
                log.warning("status of %s/%s: %s (attempt %d)", meta["namespace"], meta["name"], exc.reason, attempt + 1)
                time.sleep(0.5 * (attempt + 1))

    def delete_pod_now(self, pod: dict) -> None:
        """What the kubelet does once containers are gone: delete with grace 0."""
        from kubernetes.client.exceptions import ApiException

        meta = pod["metadata"]
        try:
            self.core.delete_namespaced_pod(meta["name"], meta["namespace"], grace_period_seconds=0,
                                            body={"preconditions": {"uid": meta["uid"]}, "gracePeriodSeconds": 0})
        except ApiException as exc:
            if exc.status not in (404, 409):
                log.warning("delete %s/%s: %s", meta["namespace"], meta["name"], exc.reason)

    def read_data(self, kind: str, namespace: str, name: str, optional: bool) -> dict[str, bytes] | None:
        """ConfigMap or Secret data as bytes; None when optional and missing."""
        from kubernetes.client.exceptions import ApiException

        try:
            if kind == "configMap":
                cm = self.core.read_namespaced_config_map(name, namespace)
                data = {k: v.encode() for k, v in (cm.data or {}).items()}
                data.update({k: base64.b64decode(v) for k, v in (cm.binary_data or {}).items()})
                return data
            secret = self.core.read_namespaced_secret(name, namespace)
            return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}
        except ApiException as exc:
            if exc.status == 404 and optional:
                return None
            if exc.status == 404:
                raise PodSetupError("CreateContainerConfigError", f"{kind} {name!r} not found") from None
            raise

    def container_env(self, pod: dict, container: dict) -> dict[str, str]:
        ns = pod["metadata"]["namespace"]
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/root"),
            "HOSTNAME": pod["spec"].get("hostname") or pod["metadata"]["name"],
            **kubernetes_env(self.apiserver_port),
        }
        for src in container.get("envFrom") or []:
            kind = "configMap" if "configMapRef" in src else "secret"
            ref = src.get("configMapRef") or src.get("secretRef")
            data = self.read_data(kind, ns, ref["name"], bool(ref.get("optional"))) or {}
            env.update({src.get("prefix", "") + k: v.decode(errors="replace") for k, v in data.items()})
        for var in container.get("env") or []:
            if "valueFrom" not in var:
                env[var["name"]] = expand(var.get("value") or "", env)
                continue
            vf = var["valueFrom"]
            if "fieldRef" in vf:
                env[var["name"]] = field_ref(pod, vf["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in vf:
                target = next((c for c in pod["spec"]["containers"] if c["name"] == vf["resourceFieldRef"].get("containerName")), container)
                env[var["name"]] = resource_field_ref(target, vf["resourceFieldRef"], self.capacity)
            else:
                kind = "configMap" if "configMapKeyRef" in vf else "secret"
                ref = vf.get("configMapKeyRef") or vf.get("secretKeyRef")
                data = self.read_data(kind, ns, ref["name"], bool(ref.get("optional")))
                if data is None or ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    raise PodSetupError("CreateContainerConfigError", f"key {ref['key']!r} not found in {kind} {ref['name']!r}")
                env[var["name"]] = data[ref["key"]].decode(errors="replace")
        return env

    def materialise_volume(self, runner: PodRunner, volume: dict, volumes_dir: Path) -> str:
        """Make the volume's content on the host; return the directory to bind."""
        name, pod = volume["name"], runner.pod
        ns = pod["metadata"]["namespace"]
        target = volumes_dir / name
        if "persistentVolumeClaim" in volume:
            path = self.state_dir / "pvc" / volume["persistentVolumeClaim"]["claimName"]
            path.mkdir(parents=True, exist_ok=True)
            return str(path)
        if "hostPath" in volume:
            path = Path(volume["hostPath"]["path"])
            if volume["hostPath"].get("type") in ("DirectoryOrCreate",):
                path.mkdir(parents=True, exist_ok=True)
            return str(path)
        target.mkdir(parents=True, exist_ok=True)
        if "emptyDir" in volume:
            return str(target)
        if "configMap" in volume or "secret" in volume:
            kind = "configMap" if "configMap" in volume else "secret"
            self.write_keyed(target, kind, ns, volume[kind], volume[kind].get("name") or volume[kind].get("secretName"))
            return str(target)
        if "downwardAPI" in volume:
            self.write_downward(target, pod, volume["downwardAPI"].get("items") or [])
            return str(target)
        if "projected" in volume:
            for source in volume["projected"].get("sources") or []:
                if "serviceAccountToken" in source:
                    sat = source["serviceAccountToken"]
                    token = ProjectedToken(target / sat["path"], pod["spec"].get("serviceAccountName") or "default",
                                           sat.get("audience") or "", int(sat.get("expirationSeconds") or 3600))
                    self.write_token(runner, token)
                    runner.tokens.append(token)
                elif "configMap" in source or "secret" in source:
                    kind = "configMap" if "configMap" in source else "secret"
                    self.write_keyed(target, kind, ns, source[kind], source[kind]["name"])
                elif "downwardAPI" in source:
                    self.write_downward(target, pod, source["downwardAPI"].get("items") or [])
                else:
                    raise PodSetupError("CreateContainerConfigError", f"unsupported projected source {sorted(source)}")
            return str(target)
        raise PodSetupError("CreateContainerConfigError", f"volume {name!r}: unsupported type {sorted(set(volume) - {'name'})}")

    def write_keyed(self, target: Path, kind: str, ns: str, source: dict, obj_name: str) -> None:
        data = self.read_data(kind, ns, obj_name, bool(source.get("optional")))
        if data is None:
            return
        items = source.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            if item["key"] not in data:
                if source.get("optional"):
                    continue
                raise PodSetupError("CreateContainerConfigError", f"key {item['key']!r} not found in {kind} {obj_name!r}")
            write_atomic(target / item["path"], data[item["key"]])

    @staticmethod
    def write_downward(target: Path, pod: dict, items: list[dict]) -> None:
        for item in items:
            if "fieldRef" not in item:
                raise PodSetupError("CreateContainerConfigError", "downwardAPI resourceFieldRef items are not supported")
            write_atomic(target / item["path"], field_ref(pod, item["fieldRef"]["fieldPath"]).encode())

    def write_token(self, runner: PodRunner, token: ProjectedToken) -> None:
        """TokenRequest for the pod's service account, bound to the pod (as the kubelet does)."""
        from kubernetes.client.exceptions import ApiException

        meta = runner.pod["metadata"]
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": [token.audience] if token.audience else [],
                "expirationSeconds": token.expiration_seconds,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]},
            },
        }
        try:
            result = self.core.create_namespaced_service_account_token(token.service_account, meta["namespace"], body)
        except ApiException as exc:
            raise PodSetupError("CreateContainerConfigError",
                                f"token for serviceaccount {token.service_account!r}: {exc.status} {exc.reason}") from None
        write_atomic(token.path, result.status.token.encode())
        token.written_at = time.monotonic()

    def refresh_tokens(self, runner: PodRunner) -> None:
        for token in runner.tokens:
            if time.monotonic() - token.written_at > TOKEN_REFRESH_FRACTION * token.expiration_seconds:
                try:
                    self.write_token(runner, token)
                except PodSetupError as exc:
                    log.warning("refreshing token of %s: %s", runner.name, exc)
                    token.written_at = time.monotonic() - TOKEN_REFRESH_FRACTION * token.expiration_seconds + 10

    # -- pod events

    def reconcile(self, pod: dict) -> None:
        meta, status = pod["metadata"], pod.get("status") or {}
        uid, deleting = meta["uid"], meta.get("deletionTimestamp")
        grace = meta.get("deletionGracePeriodSeconds") or pod["spec"].get("terminationGracePeriodSeconds") or 30
        with self.lock:
            runner = self.runners.get(uid)
            if runner:
                if deleting:
                    runner.request_kill(grace)
                return
            if uid in self.finished or status.get("phase") in ("Succeeded", "Failed"):
                if deleting:
                    self.delete_pod_now(pod)
                return
            if deleting:  # deleted before we ever ran it
                runner = PodRunner(self, pod)
                runner.kill_requested.set()
            elif status.get("phase") == "Running":
                # Started by an earlier agent whose processes are gone.
                self.finished[uid] = time.monotonic()
                self.patch_pod_status(pod, {"phase": "Failed", "reason": "NodeAgentRestarted",
                                            "message": "the process-node agent restarted; the pod's processes are gone"})
                return
            else:
                runner = PodRunner(self, pod)
            self.runners[uid] = runner
        log.info("starting pod %s", runner.name)
        threading.Thread(target=runner.run, name=f"pod-{runner.name}", daemon=True).start()

    def forget(self, pod: dict) -> None:
        """The pod object is gone: stop its processes at once."""
        with self.lock:
            runner = self.runners.get(pod["metadata"]["uid"])
        if runner:
            runner.request_kill(0)

    def runner_done(self, runner: PodRunner) -> None:
        with self.lock:
            uid = runner.pod["metadata"]["uid"]
            self.runners.pop(uid, None)
            self.start_times.pop(uid, None)
            self.finished[uid] = time.monotonic()
            # Remember finished pods for a while only: stale events arrive within seconds.
            for old in [u for u, t in self.finished.items() if time.monotonic() - t > 3600]:
                del self.finished[old]

    def watch_loop(self) -> None:
        from kubernetes import watch

        selector = f"spec.nodeName={self.node_name}"
        while not self.stop.is_set():
            try:
                listed = self.core.list_pod_for_all_namespaces(field_selector=selector)
                present = set()
                for pod in listed.items:
                    d = self.api.sanitize_for_serialization(pod)
                    present.add(d["metadata"]["uid"])
                    self.reconcile(d)
                with self.lock:
                    gone = [r for uid, r in self.runners.items() if uid not in present]
                for r in gone:
                    r.request_kill(0)
                stream = watch.Watch().stream(
                    self.core.list_pod_for_all_namespaces, field_selector=selector,
                    resource_version=listed.metadata.resource_version, timeout_seconds=30, _request_timeout=45,
                )
                for event in stream:
                    if event["type"] == "ERROR":
                        break
                    d = self.api.sanitize_for_serialization(event["object"])
                    if event["type"] == "DELETED":
                        self.forget(d)
                    else:
                        self.reconcile(d)
            except Exception:  # noqa: BLE001 - relist after any watch failure
                if self.stop.is_set():
                    return
                log.exception("pod watch failed; relisting")
                time.sleep(1)

    def shutdown(self) -> None:
        """Stop every pod process (SIGTERM, then SIGKILL after 3 s)."""
        self.stop.set()
        with self.lock:
            runners = list(self.runners.values())
        procs = [p for r in runners for p in r.procs.values() if p.poll() is None]
        PodRunner.signal(procs, signal.SIGTERM)
        deadline = time.monotonic() + 3
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        PodRunner.signal([p for p in procs if p.poll() is None], signal.SIGKILL)


def write_atomic(path: Path, data: bytes) -> None:
    """Write-then-rename, so a reader (and a bind-mounted directory) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="DEV/TEST TOOL: process-backed node agent of the sft dev cluster")
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--node-name", default="sft-local-0")
    parser.add_argument("--apiserver-port", type=int, required=True)
    parser.add_argument("--cpu", default="2")
    parser.add_argument("--memory", default="16Gi")
    parser.add_argument("--gpus", default="0", help="nvidia.com/gpu to advertise (the host's GPUs, if any)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    from kubernetes import config

    api = config.new_client_from_config(config_file=args.kubeconfig)
    api.configuration.connection_pool_maxsize = 32
    capacity = {"cpu": args.cpu, "memory": args.memory, "pods": "110", "nvidia.com/gpu": args.gpus}
    agent = Agent(api, args.node_name, args.state_dir.resolve(), args.apiserver_port, capacity)

    # The watch runs in a thread; the main thread only waits for SIGTERM/SIGINT, so a
    # signal never lands in the middle of API or lock code.
    signal.signal(signal.SIGTERM, lambda *_: agent.stop.set())
    signal.signal(signal.SIGINT, lambda *_: agent.stop.set())
    agent.register()
    threading.Thread(target=agent.heartbeat_loop, name="heartbeat", daemon=True).start()
    threading.Thread(target=agent.watch_loop, name="pod-watch", daemon=True).start()
    while not agent.stop.wait(1.0):
        pass
    log.info("shutting down")
    agent.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
