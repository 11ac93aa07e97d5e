"""What a real node could leave on this machine, read straight from the kernel and the
filesystem, so a test can compare the machine before `up` and after `down`.

Other engineers' tools run on the same machine meanwhile (podman builds mount overlays
and may add veths and netfilter chains), so their known paths and chains are left out.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from sft_devcluster import node as realnode

NODE_PROGRAMS = {"containerd", "containerd-shim-runc-v2", "runc", "kubelet", "kube-proxy", "coredns"}
OTHERS = ("/var/lib/containers", "/run/containers", "/run/libpod", "/run/user", "/run/netns/netns-", "podman",
          "NETAVARK", "netavark", "CNI-", "buildah", "libpod")
SYSCTLS = (*realnode.KERNEL_TUNABLES, "net.ipv4.ip_forward", "net.ipv4.conf.all.forwarding",
           "net.ipv4.conf.all.route_localnet", "net.bridge.bridge-nf-call-iptables")
PATHS = (*realnode.HOST_DIRS, str(realnode.RUN_DIR), "/run/containerd", "/var/lib/containerd", "/run/nri",
         "/opt/containerd", "/etc/cdi", "/var/run/cdi", "/var/run/netns", "/etc/cni", "/opt/cni")


def _mine(line: str) -> bool:
    return not any(other in line for other in OTHERS)


def _lines(*cmd: str) -> set[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return {line for line in proc.stdout.splitlines() if line.strip() and _mine(line)}


def host_snapshot() -> dict:
    procs = set()
    for entry in Path("/proc").iterdir():
        try:
            name = Path(entry.joinpath("cmdline").read_bytes().split(b"\0")[0].decode()).name
        except (OSError, IndexError, ValueError):
            continue
        if name in NODE_PROGRAMS:
            procs.add(f"{entry.name} {name}")
    cgroups = set()
    for mount, _ in realnode.cgroup_mounts():
        cgroups |= {str(d) for d in mount.iterdir() if d.is_dir() and _mine(str(d))}
    netfilter = set()
    for binary in ("iptables-save", "ip6tables-save"):
        netfilter |= {f"{binary} {line}" for line in _lines(binary) if not line.startswith(("#", "["))}
    return {
        "processes": procs,
        "mounts": {line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines() if _mine(line)},
        "links": {line.split(":")[1].strip().split("@")[0] for line in _lines("ip", "-o", "link")},
        "addresses": {" ".join(line.split()[1:4]) for line in _lines("ip", "-o", "addr")},
        "routes": _lines("ip", "route", "show", "table", "all"),
        "netfilter": netfilter,
        "nft tables": _lines("nft", "list", "tables"),
        "sysctls": {f"{name}={p.read_text().strip()}" for name in SYSCTLS
                    if (p := Path("/proc/sys", name.replace(".", "/"))).exists()},
        "cgroups": cgroups,
        "paths": {str(f) for d in PATHS if Path(d).exists() for f in [Path(d), *Path(d).rglob("*")]},
    }


def differences(before: dict, after: dict) -> dict:
    """Per kind: what appeared ("+ ...") or disappeared ("- ...")."""
    out = {}
    for kind in before:
        diff = sorted(f"+ {x}" for x in after[kind] - before[kind]) + sorted(f"- {x}" for x in before[kind] - after[kind])
        if diff:
            out[kind] = diff
    return out
