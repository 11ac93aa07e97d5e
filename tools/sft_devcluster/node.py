"""The dev cluster's real node ``sft-node-0``: containerd + runc + a CNI bridge, the kubelet,
kube-proxy (iptables mode) and CoreDNS, with pod and Service addresses on a private bridge.

What runs where (one node per machine, guarded by a host-wide lock):

  <state dir>/node/     configs, the kubelet's root dir, pod logs, IPAM state
  <cache>/node/         binaries and image archives (scripts/node-bin.sh) and containerd's
                        image store, kept between runs so an image is imported once
  /run/sft-node/        containerd's state, sockets and runc's root (unix socket paths
                        must stay short), and what ``up`` found on the host, for ``down``

Pods get addresses from ``POD_CIDR`` on the bridge ``sft-br0``, whose own address is the
node IP; the API server, the kubelet and CoreDNS listen there. Nothing is routed or
masqueraded to another interface: pods have no default route, forwarding is switched on
for the bridge alone, and netfilter rules tagged ``sft-node`` drop whatever would cross
between the bridge and another interface.

The module is pure builders (configs, command lines, rules) plus the I/O that applies and
removes them: ``cluster.up`` calls ``prepare_host`` and starts the processes, ``cluster.down``
stops them, ``stop_pods`` and ``teardown``.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from .images import archive_images, import_archives
from .processes import DevClusterError, marked_processes, signal_all, wait_gone

NODE_NAME = "sft-node-0"
BRIDGE = "sft-br0"
POD_CIDR = "10.244.0.0/24"
NODE_IP = "10.244.0.1"  # the bridge's own address; a node IP can't be loopback
POD_IP_RANGE = ("10.244.0.10", "10.244.0.250")
SERVICE_CIDR = "10.96.0.0/16"
CLUSTER_DOMAIN = "cluster.local"
CGROUP_PARENT = "sft-node"
RUN_DIR = Path("/run/sft-node")
LOCK_FILE = Path("/run/lock/sft-real-node.lock")
RULE_TAG = "sft-node"
CNI_NETWORK = "sft-node"
DEFAULT_GPUS = 8
GPU_RESOURCE = "nvidia.com/gpu"
LABELS = {"sft.dev/real-node": "true", "nvidia.com/gpu.present": "true"}
# The one list of programs the dev cluster and the tests run on the host, with their packages.
HOST_TOOLS_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "host-tools.sh"
RUNC = Path(os.environ.get("SFT_RUNC", "/usr/sbin/runc"))  # Debian's runc
CNI_BIN_DIR = Path(os.environ.get("SFT_CNI_BIN_DIR", "/usr/lib/cni"))  # Debian's containernetworking-plugins
# Stop order: the kubelet first (it would restart what we stop), containerd last.
COMPONENTS = ("kubelet", "kube-proxy", "coredns", "containerd")
# Kernel settings the kubelet changes at start (pkg/kubelet/cm setupKernelTunables); down restores them.
KERNEL_TUNABLES = ("vm.overcommit_memory", "vm.panic_on_oom", "kernel.panic", "kernel.panic_on_oops",
                   "kernel.keys.root_maxkeys", "kernel.keys.root_maxbytes")
# Paths the kubelet and libcni use whatever their configuration says, with the entries they
# put there; down removes those entries and the directories that were not there before.
HOST_DIRS = ("/var/lib/kubelet", "/var/lib/kubelet/device-plugins", "/var/log/containers",
             "/var/lib/cni", "/var/lib/cni/results")
BUILTIN_CHAINS = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}
DEVICE_PLUGIN_FILES = ("kubelet.sock", "kubelet_internal_checkpoint", "DEPRECATION")


@dataclass(frozen=True)
class NodeLayout:
    """Where the node's files live (pure)."""

    state: Path  # <cluster state dir>/node
    cache: Path  # <cache>/node, made by scripts/node-bin.sh
    k8s_bin: Path  # kubelet, kube-proxy
    run: Path = RUN_DIR

    @property
    def bin(self) -> Path:
        return self.cache / "bin"

    @property
    def images(self) -> Path:
        return self.cache / "images"

    @property
    def containerd_root(self) -> Path:
        return self.cache / "containerd"

    @property
    def socket(self) -> Path:
        return self.run / "containerd.sock"

    @property
    def kubelet_root(self) -> Path:
        return self.state / "kubelet"

    @property
    def pod_logs(self) -> Path:
        return self.state / "pod-logs"

    @property
    def cni_conf_dir(self) -> Path:
        return self.state / "cni" / "net.d"

    @property
    def host_record(self) -> Path:
        return self.run / "host.json"

    def config(self, name: str) -> Path:
        return self.state / name


# ---------------------------------------------------------------- pure builders


def containerd_config(layout: NodeLayout, pause_image: str) -> str:
    """containerd's config: own root, state and sockets; runc with cgroupfs; our CNI network."""
    run = layout.run
    return f"""\
# Written by sft_devcluster/node.py.
version = 4
root = '{layout.containerd_root}'
state = '{run / "containerd"}'
oom_score = 0
imports = []
# NRI would listen on /var/run/nri; the opt plugin would create /opt/containerd.
disabled_plugins = ['io.containerd.nri.v1.nri', 'io.containerd.internal.v1.opt']

[plugins]
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = '{pause_image}'  # built from Kubernetes' pause.c; no registry here

  [plugins.'io.containerd.cri.v1.runtime']
    enable_cdi = false
    enable_criu = false
    netns_mounts_under_state_dir = true
    # Root here lacks CAP_SYS_RESOURCE, so the kernel refuses a negative oom_score_adj
    # (the pause container asks for -998) and every sandbox fails; clamp it instead.
    restrict_oom_score_adj = true
    tolerate_missing_hugetlb_controller = true
    disable_hugetlb_controller = true
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = 'runc'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = 'io.containerd.runc.v2'
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          BinaryName = '{RUNC}'
          Root = '{run / "runc"}'
          SystemdCgroup = false
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ['{CNI_BIN_DIR}']
      conf_dir = '{layout.cni_conf_dir}'
      max_conf_num = 1

  [plugins.'io.containerd.grpc.v1.cri']
    disable_tcp_service = true
    stream_server_address = '127.0.0.1'
    stream_server_port = '0'

  [plugins.'io.containerd.server.v1.grpc']
    address = '{layout.socket}'
  [plugins.'io.containerd.server.v1.ttrpc']
    address = '{layout.socket}.ttrpc'
  [plugins.'io.containerd.server.v1.debug']
    address = ''
  [plugins.'io.containerd.server.v1.metrics']
    address = ''
  [plugins.'io.containerd.shim.v1.manager']
    socket_dir = '{run / "s"}'

  [plugins.'io.containerd.image-verifier.v1.bindir']
    bin_dir = '{layout.state / "image-verifiers"}'
"""


def kubelet_config(layout: NodeLayout, pki_dir: Path, ports: dict[str, int]) -> dict:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # This machine: cgroup v1 (hybrid), no systemd, root without CAP_SYS_RESOURCE.
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": f"/{CGROUP_PARENT}",  # created by prepare_host; keeps pod cgroups in one tree
        "cgroupsPerQOS": True,
        "failSwapOn": False,
        "oomScoreAdj": 0,
        "maxOpenFiles": 20000,
        "containerRuntimeEndpoint": f"unix://{layout.socket}",
        "imageServiceEndpoint": f"unix://{layout.socket}",
        "address": NODE_IP,
        "port": ports["kubelet"],
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": ports["kubelet-healthz"],
        "podLogsDir": str(layout.pod_logs),
        "volumePluginDir": str(layout.kubelet_root / "volume-plugins"),
        "resolvConf": str(layout.config("resolv.conf")),
        "clusterDNS": [NODE_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(pki_dir / "ca.crt")},
        },
        "authorization": {"mode": "Webhook"},
        "tlsCertFile": str(pki_dir / "kubelet-serving.crt"),
        "tlsPrivateKeyFile": str(pki_dir / "kubelet-serving.key"),
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "maxPods": 50,
        "podPidsLimit": 4096,
        # A shared development machine: evict only when really short, never garbage-collect
        # images (they were imported from archives and can't be pulled again).
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                         "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "nodeStatusUpdateFrequency": "5s",
        "syncFrequency": "10s",
        "shutdownGracePeriod": "0s",
        "containerLogMaxSize": "10Mi",
        "containerLogMaxFiles": 2,
    }


def kube_proxy_config(layout: NodeLayout, ports: dict[str, int]) -> dict:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(layout.config("kube-proxy.kubeconfig"))},
        "hostnameOverride": NODE_NAME,
        "mode": "iptables",
        "clusterCIDR": POD_CIDR,
        "bindAddress": NODE_IP,
        "healthzBindAddress": f"127.0.0.1:{ports['kube-proxy-healthz']}",
        "metricsBindAddress": f"127.0.0.1:{ports['kube-proxy-metrics']}",
        "nodePortAddresses": [f"{NODE_IP}/32"],
        "oomScoreAdj": 0,  # negative scores are refused here
        # No route_localnet sysctl, and the host's conntrack settings stay as they are.
        "iptables": {"localhostNodePorts": False, "masqueradeAll": False},
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
    }


def cni_conflist(layout: NodeLayout) -> dict:
    """Bridge + host-local IPAM. The bridge and its address exist before (prepare_host), so
    the plugin neither adds a gateway address nor turns on forwarding; no masquerade, and
    the only route besides the pod subnet is the Service range through the node."""
    return {
        "cniVersion": "1.0.0",
        "name": CNI_NETWORK,
        "plugins": [{
            "type": "bridge",
            "bridge": BRIDGE,
            "isGateway": False,
            "ipMasq": False,
            "hairpinMode": True,
            "ipam": {
                "type": "host-local",
                "dataDir": str(layout.state / "cni" / "ipam"),
                "ranges": [[{"subnet": POD_CIDR, "rangeStart": POD_IP_RANGE[0],
                             "rangeEnd": POD_IP_RANGE[1], "gateway": NODE_IP}]],
                "routes": [{"dst": SERVICE_CIDR, "gw": NODE_IP}],
            },
        }],
    }


def corefile(layout: NodeLayout, ports: dict[str, int]) -> str:
    """Cluster DNS on the node IP: Services, headless-Service pod names and pods. Any other
    name is answered NXDOMAIN at once (no upstream: pods can't reach beyond this machine).
    No cache plugin: answers come from the plugin's watch, so a pod that starts is found
    at once instead of after a cached NXDOMAIN expires (multi-node rendezvous)."""
    return f"""\
{CLUSTER_DOMAIN}:53 in-addr.arpa:53 ip6.arpa:53 {{
    bind {NODE_IP}
    errors
    health 127.0.0.1:{ports['coredns-health']}
    ready 127.0.0.1:{ports['coredns-ready']}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {layout.config('coredns.kubeconfig')} sft-dev
        pods insecure
        ttl 5
    }}
}}
.:53 {{
    bind {NODE_IP}
    errors
    template ANY ANY {{
        rcode NXDOMAIN
    }}
}}
"""


def component_commands(layout: NodeLayout) -> dict[str, list[str]]:
    labels = ",".join(f"{k}={v}" for k, v in sorted(LABELS.items()))
    return {
        "containerd": [str(layout.bin / "containerd"), f"--config={layout.config('containerd.toml')}"],
        "kubelet": [
            str(layout.k8s_bin / "kubelet"), f"--config={layout.config('kubelet.yaml')}",
            f"--kubeconfig={layout.config('kubelet.kubeconfig')}", f"--root-dir={layout.kubelet_root}",
            f"--cert-dir={layout.kubelet_root / 'pki'}", f"--hostname-override={NODE_NAME}",
            f"--node-ip={NODE_IP}", f"--node-labels={labels}", "--v=1",
        ],
        "kube-proxy": [str(layout.k8s_bin / "kube-proxy"), f"--config={layout.config('kube-proxy.yaml')}", "--v=1"],
        "coredns": [str(layout.bin / "coredns"), "-conf", str(layout.config("Corefile"))],
    }


def component_env(layout: NodeLayout) -> dict[str, str]:
    # containerd finds its shim on PATH; the kubelet and kube-proxy call iptables and mount.
    path = [str(layout.bin), str(layout.k8s_bin), os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]
    return {"PATH": os.pathsep.join(p for p in path if p)}


def netfilter_rules() -> list[tuple[str, str, list[str]]]:
    """(table, chain, rule) that keep pod and Service traffic on this machine (pure).

    raw PREROUTING: nothing from another host reaches a pod, the node IP or a Service IP.
    mangle FORWARD: nothing is forwarded between the bridge and another interface (mangle
    comes before filter, where kube-proxy puts its own ACCEPT rules).
    """
    tag = ["-m", "comment", "--comment", RULE_TAG, "-j", "DROP"]
    from_outside = ["!", "-i", BRIDGE, "-m", "addrtype", "!", "--src-type", "LOCAL"]
    return [
        ("raw", "PREROUTING", ["-d", POD_CIDR, *from_outside, *tag]),
        ("raw", "PREROUTING", ["-d", SERVICE_CIDR, *from_outside, *tag]),
        ("mangle", "FORWARD", ["-i", BRIDGE, "!", "-o", BRIDGE, *tag]),
        ("mangle", "FORWARD", ["!", "-i", BRIDGE, "-o", BRIDGE, *tag]),
    ]


def gpu_capacity_patch(gpus: int) -> list[dict]:
    """The documented way to advertise an extended resource: a JSON patch of node status."""
    return [{"op": "add", "path": "/status/capacity/" + GPU_RESOURCE.replace("/", "~1"), "value": str(gpus)}]


def write_configs(layout: NodeLayout, pki_dir: Path, ports: dict[str, int], pause_image: str) -> None:
    layout.state.mkdir(parents=True, exist_ok=True)
    layout.cni_conf_dir.mkdir(parents=True, exist_ok=True)
    layout.pod_logs.mkdir(parents=True, exist_ok=True)
    layout.config("containerd.toml").write_text(containerd_config(layout, pause_image))
    layout.config("kubelet.yaml").write_text(yaml.safe_dump(kubelet_config(layout, pki_dir, ports)))
    layout.config("kube-proxy.yaml").write_text(yaml.safe_dump(kube_proxy_config(layout, ports)))
    layout.config("Corefile").write_text(corefile(layout, ports))
    # Pods get the cluster DNS and search path from the kubelet; nothing from the host's resolver.
    layout.config("resolv.conf").write_text("")
    (layout.cni_conf_dir / f"10-{CNI_NETWORK}.conflist").write_text(json.dumps(cni_conflist(layout), indent=2))


# ---------------------------------------------------------------- the host-wide lock


class NodeLock:
    """One real node per machine: its paths, bridge, rules and cgroups are fixed names.

    The lock is an flock on ``LOCK_FILE`` whose descriptor the node's processes inherit, so
    it is held exactly as long as any of them lives (a crash frees it). The file says who
    holds it."""

    def __init__(self, fd: int):
        self.fd = fd

    @staticmethod
    def holder() -> dict:
        try:
            return json.loads(LOCK_FILE.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    @classmethod
    def try_acquire(cls) -> NodeLock | None:
        LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return cls(fd)

    @classmethod
    def acquire(cls, state_dir: Path, wait: float = 0.0, say=print) -> NodeLock:
        """Take the lock, waiting up to ``wait`` seconds; fail saying who holds it."""
        deadline = time.monotonic() + wait
        told = False
        while True:
            lock = cls.try_acquire()
            if lock:
                return lock
            who = describe_holder(cls.holder())
            if time.monotonic() >= deadline:
                holder = cls.holder().get("stateDir", "<its state dir>")
                raise DevClusterError(
                    f"the real node is in use by {who} (one per machine; lock {LOCK_FILE}). "
                    f"Wait for it (--node-wait SECONDS), stop it (`sftctl dev-cluster down --dir {holder}`), "
                    "or start this cluster without a node (--no-real-node).")
            if not told:
                say(f"waiting up to {wait:.0f}s for the real node, in use by {who}")
                told = True
            time.sleep(0.5)

    @classmethod
    def for_start(cls, state_dir: Path, layout: NodeLayout) -> NodeLock:
        """The lock for one node process that ``start`` brings back, so that it holds the lock
        like its siblings: a copy of the descriptor a running process of the node holds, or the
        lock itself when none runs (then the host must still be as this cluster's ``up`` made it)."""
        lock = cls.try_acquire()
        if lock:
            try:
                owner = json.loads(layout.host_record.read_text()).get("stateDir")
            except (OSError, ValueError):
                owner = None
            if owner != str(state_dir):
                lock.release()
                raise DevClusterError(
                    f"the machine's real node is no longer the one of {state_dir} (`down` ran, or another "
                    f"cluster's node ran since); `sftctl dev-cluster up --dir {state_dir}` starts it afresh")
            if not cls.holder():
                lock.claim(state_dir)
            return lock
        holder = cls.holder()
        if holder.get("stateDir") != str(state_dir):
            raise DevClusterError(f"the real node is in use by {describe_holder(holder)} (lock {LOCK_FILE})")
        fd = _lock_descriptor_of(marked_processes(state_dir))
        if fd is None:
            raise DevClusterError(f"the node lock {LOCK_FILE} is held, but by no process of {state_dir}")
        return cls(fd)

    def claim(self, state_dir: Path) -> None:
        owner = {"stateDir": str(state_dir), "pid": os.getpid(),
                 "command": " ".join(_cmdline(os.getpid())), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(owner) + "\n").encode(), 0)

    def release(self, clear: bool = False) -> None:
        if self.fd < 0:
            return
        if clear:
            os.ftruncate(self.fd, 0)
        os.close(self.fd)  # the node's processes keep their inherited copies
        self.fd = -1


def _lock_descriptor_of(pids: list[int]) -> int | None:
    """A copy (pidfd_getfd(2), Linux >= 5.6) of the locked descriptor one of ``pids`` holds:
    an flock belongs to the open file, so the copy holds the lock too. Reopening the file would not."""
    lock = os.stat(LOCK_FILE)
    libc = ctypes.CDLL(None, use_errno=True)
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) != (lock.st_dev, lock.st_ino):
                continue
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                copy = libc.syscall(438, pidfd, int(fd), 0)  # SYS_pidfd_getfd, the same number on every arch
            finally:
                os.close(pidfd)
            if copy >= 0:
                return copy
    return None


def describe_holder(owner: dict) -> str:
    if not owner:
        return "another process"
    return f"the dev cluster in {owner.get('stateDir')} (started {owner.get('since')} by pid {owner.get('pid')}: {owner.get('command')})"


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


# ---------------------------------------------------------------- host setup


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise DevClusterError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def cgroup_mounts() -> list[tuple[Path, str]]:
    """(mount point, fstype) of every cgroup hierarchy on this machine."""
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] in ("cgroup", "cgroup2"):
            found.append((Path(fields[1]), fields[2]))
    return found


def nft_tables() -> list[str]:
    proc = _run("nft", "list", "tables", check=False)
    return sorted(line.strip() for line in proc.stdout.splitlines() if line.strip())


def missing_host_tools(path: str) -> list[tuple[str, str]]:
    """(tool, Debian package) for each host tool that scripts/host-tools.sh names and this PATH lacks."""
    bash = shutil.which("bash") or "/bin/bash"  # found on our PATH: the one checked may lack it
    proc = subprocess.run([bash, str(HOST_TOOLS_SCRIPT), "--check"], capture_output=True, text=True,
                          env={**os.environ, "PATH": path})
    if proc.returncode not in (0, 1):
        raise DevClusterError(f"{HOST_TOOLS_SCRIPT} --check failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return [(tool, package.strip("()")) for tool, package in (line.split() for line in proc.stdout.splitlines())]


def check_prerequisites(layout: NodeLayout) -> None:
    """Fail early and clearly instead of half-way through ``up``."""
    problems = []
    if os.geteuid() != 0:
        problems.append("the real node needs root (kubelet, containerd, bridge, iptables, cgroups)")
    for path in (layout.bin / "containerd", layout.bin / "coredns", layout.bin / "crictl",
                 layout.k8s_bin / "kubelet", layout.k8s_bin / "kube-proxy", layout.images / "pause.tar"):
        if not path.exists():
            problems.append(f"{path} is missing (run scripts/node-bin.sh)")
    for path in (RUNC, CNI_BIN_DIR):  # only when moved with SFT_RUNC / SFT_CNI_BIN_DIR
        if not path.exists():
            problems.append(f"{path} is missing")
    lacking = missing_host_tools(component_env(layout)["PATH"])
    if lacking:
        packages = sorted({package for _, package in lacking if package != "-"})
        problems.append("host tools missing: " + ", ".join(f"`{tool}` ({package})" for tool, package in lacking)
                        + (f"; install them with `bash scripts/host-tools.sh` (apt-get install {' '.join(packages)})"
                           if packages else ""))
    if problems:
        raise DevClusterError("the real node can't start: " + "; ".join(problems))


def prepare_host(layout: NodeLayout, state_dir: Path) -> None:
    """Bridge, netfilter rules, forwarding on the bridge, cgroup parents; remembering what
    was there before. Call with the node lock held, after ``teardown`` of any leftovers."""
    layout.run.mkdir(parents=True, exist_ok=True)
    record = {
        "stateDir": str(state_dir),
        "podLogs": str(layout.pod_logs),
        "sysctls": {name: _sysctl_path(name).read_text().strip() for name in KERNEL_TUNABLES
                    if _sysctl_path(name).exists()},
        "dirs": [d for d in HOST_DIRS if Path(d).exists()],
        "nftTables": nft_tables(),
    }
    layout.host_record.write_text(json.dumps(record, indent=2) + "\n")

    _run("ip", "link", "add", BRIDGE, "type", "bridge")
    _run("ip", "addr", "add", f"{NODE_IP}/{POD_CIDR.split('/')[1]}", "dev", BRIDGE)
    _run("ip", "link", "set", BRIDGE, "up")
    # Forwarding for packets that arrive on the bridge only (pod -> Service -> pod comes back
    # through the node); the host's global ip_forward stays as it is. Goes with the bridge.
    _sysctl_path(f"net.ipv4.conf.{BRIDGE}.forwarding").write_text("1\n")
    for table, chain, rule in netfilter_rules():
        _run("iptables", "-w", "-t", table, "-I", chain, *rule)

    mounts = cgroup_mounts()
    hybrid = any(fstype == "cgroup" for _, fstype in mounts)
    for mount, fstype in mounts:
        if fstype == "cgroup2" and hybrid:
            continue  # runc makes what it needs under the unified hierarchy
        parent = mount / CGROUP_PARENT
        parent.mkdir(exist_ok=True)
        if fstype == "cgroup" and (mount / "cpuset.cpus").exists():
            for f in ("cpuset.cpus", "cpuset.mems"):  # a v1 cpuset child starts empty
                (parent / f).write_text((mount / f).read_text())
        if fstype == "cgroup2":  # v2 only: let the node's children use the controllers
            controllers = (mount / "cgroup.subtree_control").read_text().split()
            if controllers:
                (parent / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in controllers))


# ---------------------------------------------------------------- start


def crictl(layout: NodeLayout, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """crictl against the node's containerd; a hung call reads as a failed one."""
    endpoint = f"unix://{layout.socket}"
    cmd = [str(layout.bin / "crictl"), "--config=/dev/null", f"--runtime-endpoint={endpoint}",
           f"--image-endpoint={endpoint}", "--timeout=10s", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 124, "", f"timed out after {timeout}s")


def containerd_ready(layout: NodeLayout) -> bool:
    return layout.socket.exists() and crictl(layout, "info", timeout=10).returncode == 0


def archive_reference(path: Path) -> str:
    """The one image reference in an archive of ours (the pause image)."""
    refs = list(archive_images(path))
    if len(refs) != 1:
        raise DevClusterError(f"{path}: expected one image, found {refs}")
    return refs[0]


def import_node_images(layout: NodeLayout, archives: list[Path], say=print) -> None:
    def importing(archive: Path) -> None:
        say(f"importing {archive} ({archive.stat().st_size / 2**30:.1f} GiB) into the node")

    for ref, action in import_archives(layout, archives, before_import=importing):
        if action != "present":
            say(f"image {ref}: {action}")


# ---------------------------------------------------------------- teardown


def stop_pods(layout: NodeLayout) -> None:
    """Stop and remove every pod sandbox through the CRI: runc kills the containers,
    containerd unmounts their root filesystems and calls CNI DEL for their network."""
    if not layout.socket.exists():
        return
    pods = crictl(layout, "pods", "-q")
    for pod in pods.stdout.split() if pods.returncode == 0 else []:
        crictl(layout, "stopp", pod, timeout=60)
        crictl(layout, "rmp", "-f", pod, timeout=60)


def _cgroup_dirs() -> list[Path]:
    """Our cgroups in every hierarchy, deepest first."""
    dirs = []
    for mount, _ in cgroup_mounts():
        top = mount / CGROUP_PARENT
        if top.is_dir():
            dirs += [Path(root) for root, _, _ in os.walk(top)]
    return sorted(dirs, key=lambda p: len(p.parts), reverse=True)


def _cgroup_pids() -> list[int]:
    pids = set()
    for d in _cgroup_dirs():
        try:
            pids |= {int(p) for p in (d / "cgroup.procs").read_text().split()}
        except OSError:
            pass
    return sorted(pids)


def _mounts_under(prefixes: list[Path]) -> list[str]:
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        target = line.split()[1].replace("\\040", " ")
        if any(target == str(p) or target.startswith(str(p) + "/") for p in prefixes):
            found.append(target)
    return sorted(set(found), key=len, reverse=True)


def iptables_save(binary: str, table: str) -> list[str]:
    proc = _run(f"{binary}-save", "-t", table, check=False)
    return proc.stdout.splitlines() if proc.returncode == 0 else []


def _remove_netfilter(record: dict) -> None:
    for table, chain, rule in netfilter_rules():
        while _run("iptables", "-w", "-t", table, "-D", chain, *rule, check=False).returncode == 0:
            pass
    if not record:
        return  # our node never ran here: KUBE- chains would be another Kubernetes'
    # The kubelet's and kube-proxy's chains (KUBE-*): jumps first, then flush, then delete.
    # One real node per machine, so every KUBE- chain here is this node's.
    for binary in ("iptables", "ip6tables"):
        for table in ("raw", "mangle", "nat", "filter"):
            lines = iptables_save(binary, table)
            for line in lines:
                if line.startswith("-A ") and "-j KUBE-" in line and not line.split()[1].startswith("KUBE-"):
                    _run(binary, "-w", "-t", table, *shlex.split("-D" + line[2:]), check=False)
            chains = [line[1:].split()[0] for line in lines if line.startswith(":KUBE-")]
            for flag in ("-F", "-X"):
                for chain in chains:
                    _run(binary, "-w", "-t", table, flag, chain, check=False)
    # Tables iptables-nft created for us: gone again when they hold nothing and were not there before.
    before = set(record.get("nftTables", []))
    for table in nft_tables():
        family, name = table.split()[1:3]
        binary = {"ip": "iptables", "ip6": "ip6tables"}.get(family)
        if table in before or not binary or name not in ("raw", "mangle", "nat", "filter"):
            continue
        lines = iptables_save(binary, name)
        chains = [line[1:].split()[0] for line in lines if line.startswith(":")]
        if lines and not any(line.startswith("-A ") for line in lines) and set(chains) <= BUILTIN_CHAINS:
            _run("nft", "delete", "table", family, name, check=False)


def _remove_host_entries(record: dict) -> None:
    if not record:
        return  # our node never ran here: the entries would be another kubelet's
    pod_logs = record["podLogs"]
    containers = Path("/var/log/containers")
    if containers.is_dir():
        for link in containers.iterdir():
            if link.is_symlink() and (os.readlink(link).startswith(pod_logs + "/") or not link.exists()):
                link.unlink()
    plugins = Path("/var/lib/kubelet/device-plugins")
    for name in DEVICE_PLUGIN_FILES:
        (plugins / name).unlink(missing_ok=True)
    results = Path("/var/lib/cni/results")
    if results.is_dir():
        for entry in results.iterdir():
            if entry.name.startswith((f"{CNI_NETWORK}-", "cni-loopback-")):
                entry.unlink()
    before = set(record["dirs"])
    for d in sorted(HOST_DIRS, key=len, reverse=True):
        if d not in before:
            try:
                Path(d).rmdir()
            except OSError:
                pass  # not empty: someone else's files; left alone


def teardown(layout: NodeLayout, state_dir: Path, timeout: float = 10.0) -> None:
    """Remove what the node left on this machine: pods, processes, mounts, the bridge,
    netfilter rules, sysctl changes, cgroups, host paths and /run/sft-node. Idempotent.

    Call with the node lock held; ``cluster.down`` stops the node's processes before, and
    removes the pods while containerd still runs. Without the record ``prepare_host``
    leaves in /run/sft-node (no node of ours ran here), only what carries our names goes."""
    try:
        record = json.loads(layout.host_record.read_text())
    except (OSError, ValueError):
        record = {}
    owner_state = Path(record.get("stateDir", state_dir))
    owner_layout = NodeLayout(owner_state / "node", layout.cache, layout.k8s_bin)

    # Processes: what's left of containerd's shims (they carry the state dir's marker) and
    # of the containers (in our cgroups).
    for pids in (node_processes(owner_state), _cgroup_pids()):
        signal_all(pids, 15)
        signal_all(wait_gone(pids, timeout), 9)
        wait_gone(pids, 5.0)

    for target in _mounts_under([owner_layout.state, layout.run, layout.containerd_root]):
        if _run("umount", target, check=False).returncode != 0:
            _run("umount", "-l", target, check=False)

    if Path(f"/sys/class/net/{BRIDGE}").exists():
        ports = Path(f"/sys/class/net/{BRIDGE}/brif")
        for port in list(ports.iterdir()) if ports.is_dir() else []:
            _run("ip", "link", "del", port.name, check=False)
        _run("ip", "link", "del", BRIDGE, check=False)
    _remove_netfilter(record)

    for name, value in record.get("sysctls", {}).items():
        path = _sysctl_path(name)
        if path.exists() and path.read_text().strip() != value:
            path.write_text(value + "\n")

    for _ in range(20):  # a cgroup lingers for a moment after its last process
        for d in _cgroup_dirs():
            try:
                d.rmdir()
            except OSError:
                pass
        if not _cgroup_dirs():
            break
        time.sleep(0.1)

    _remove_host_entries(record)
    shutil.rmtree(layout.run, ignore_errors=True)


def teardown_local(layout: NodeLayout) -> None:
    """Another cluster's node owns the machine now: only unmount what lies in our state dir."""
    for target in _mounts_under([layout.state]):
        if _run("umount", target, check=False).returncode != 0:
            _run("umount", "-l", target, check=False)


def node_processes(state_dir: Path) -> list[int]:
    """The node's processes of that state dir (not its control plane)."""
    names = {"containerd", "containerd-shim-runc-v2", "runc", "kubelet", "kube-proxy", "coredns"}
    return [pid for pid in marked_processes(state_dir) if _cmdline(pid)[:1] and Path(_cmdline(pid)[0]).name in names]


def leftovers(layout: NodeLayout, state_dir: Path) -> list[str]:
    """What of a node is still on this machine (empty after a clean ``teardown``)."""
    found = [f"process {pid} ({' '.join(_cmdline(pid))[:80]})" for pid in node_processes(state_dir)]
    found += [f"process {pid} in cgroup {CGROUP_PARENT}" for pid in _cgroup_pids()]
    found += [f"mount {m}" for m in _mounts_under([layout.state, layout.run, layout.containerd_root])]
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        found.append(f"bridge {BRIDGE}")
    for binary in ("iptables", "ip6tables"):
        for table in ("raw", "mangle", "nat", "filter"):
            found += [f"{binary} -t {table} {line}" for line in iptables_save(binary, table)
                      if RULE_TAG in line or "KUBE-" in line]
    found += [f"cgroup {d}" for d in _cgroup_dirs()]
    if layout.run.exists():
        found.append(f"directory {layout.run}")
    return found
