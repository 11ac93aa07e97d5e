#!/usr/bin/env bash
# Build (or reuse) what the dev cluster's real node runs, next to the control plane.
#
#   scripts/node-bin.sh          # last stdout line: the node dir (bin/ and images/)
#
# Into ${SFT_CACHE:-~/.cache/sft-operator}/node (outside the repo), from Go modules through
# the Go module proxy and from Debian packages (no Docker, no registry, no release tarballs):
#   kubelet, kube-proxy      scripts/k8s-bin.sh (same k8s.io/kubernetes build as the control plane)
#   containerd, ctr, containerd-shim-runc-v2   github.com/containerd/containerd/v2 (CGO off)
#   crictl                   sigs.k8s.io/cri-tools (down removes pod sandboxes through the CRI)
#   coredns                  github.com/coredns/coredns, with only the plugins we use (scripts/coredns)
#   runc, CNI plugins        Debian's runc and containernetworking-plugins, used in place (scripts/host-tools.sh
#                            installs them with every other host tool)
#   images/pause.tar         Kubernetes' own build/pause/linux/pause.c, gcc -static, one-layer OCI archive
#   images/busybox.tar       Debian's busybox-static as a one-layer OCI archive (the tests' image)
# Idempotent: each piece is rebuilt only when missing or built for another version; a marker
# records a complete set. Build logs go to stderr so that stdout stays machine-readable.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.36.3}
CONTAINERD_VERSION=${CONTAINERD_VERSION:-v2.3.7}
CRICTL_VERSION=${CRICTL_VERSION:-v1.37.0}
COREDNS_VERSION=${COREDNS_VERSION:-v1.15.0}

REPO=$(cd "$(dirname "$0")/.." && pwd -P)
CACHE=${SFT_CACHE:-$HOME/.cache/sft-operator}
ROOT=$CACHE/node
BIN=$ROOT/bin
IMAGES=$ROOT/images
MARKER=$ROOT/.complete
# The image recipes are part of what the marker stands for: a change to them rebuilds.
RECIPE=$(cat "$0" "$REPO/scripts/coredns/main.go" "$REPO/tools/sft_devcluster/oci.py" | sha256sum | cut -c1-12)
WANT="k8s=$K8S_VERSION containerd=$CONTAINERD_VERSION crictl=$CRICTL_VERSION coredns=$COREDNS_VERSION recipe=$RECIPE"

log() { echo "[node-bin $(date +%H:%M:%S)] $*" >&2; }
trap 'log "failed (exit $?) at line $LINENO: $BASH_COMMAND"' ERR

# The control plane's script adds kubelet and kube-proxy to its set when they are missing.
K8S_BIN=$(bash "$REPO/scripts/k8s-bin.sh" | tail -n1)
if [[ -f $MARKER && "$(cat "$MARKER")" == "$WANT" ]]; then
  echo "$ROOT"
  exit 0
fi

command -v go >/dev/null || { log "go is not installed (need Go >= 1.26)"; exit 1; }
mkdir -p "$BIN" "$IMAGES" "$ROOT/src" "$BIN/.versions"
exec 9>"$ROOT/.lock"
flock 9

export GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0
export GOCACHE=${GOCACHE_OVERRIDE:-$CACHE/gocache}
export GOBIN=$BIN

# stale NAME VERSION: true when NAME was never built, or was built for another version.
stale() { [[ "$(cat "$BIN/.versions/$1" 2>/dev/null)" != "$2" ]]; }
built() { echo "$2" >"$BIN/.versions/$1"; }

build_containerd() {
  stale containerd "$CONTAINERD_VERSION" || return 0
  log "building containerd, ctr, containerd-shim-runc-v2 $CONTAINERD_VERSION"
  # Static, no cgo: the snapshotters that need cgo or kernel features this node doesn't use are left out.
  (cd "$ROOT/src" && go install -trimpath -tags no_btrfs,no_devmapper,no_zfs \
    -ldflags "-s -w -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION" \
    "github.com/containerd/containerd/v2/cmd/containerd@$CONTAINERD_VERSION" \
    "github.com/containerd/containerd/v2/cmd/ctr@$CONTAINERD_VERSION" \
    "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION" >&2)
  built containerd "$CONTAINERD_VERSION"
}

build_crictl() {
  stale crictl "$CRICTL_VERSION" || return 0
  log "building crictl $CRICTL_VERSION"
  (cd "$ROOT/src" && go install -trimpath -ldflags "-s -w" "sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION" >&2)
  built crictl "$CRICTL_VERSION"
}

build_coredns() {
  stale coredns "$COREDNS_VERSION+$RECIPE" || return 0
  log "building coredns $COREDNS_VERSION (bind, errors, health, ready, kubernetes, template)"
  local dir=$ROOT/src/coredns
  rm -rf "$dir" && mkdir -p "$dir"
  cp "$REPO/scripts/coredns/main.go" "$dir/"
  printf 'module sft.dev/coredns-minimal\n\ngo %s\n\nrequire github.com/coredns/coredns %s\n' \
    "$(go env GOVERSION | sed 's/^go//; s/^\([0-9]*\.[0-9]*\).*/\1/').0" "$COREDNS_VERSION" >"$dir/go.mod"
  (cd "$dir" && go mod tidy >&2 &&
    go build -trimpath -ldflags "-s -w -X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION" \
      -o "$BIN/coredns" . >&2)
  built coredns "$COREDNS_VERSION+$RECIPE"
}

# The pause image, from the pause.c of the pinned Kubernetes release (in the Go module cache).
build_pause() {
  stale pause "$K8S_VERSION+$RECIPE" || return 0
  local src tag work
  src=$(cd "$ROOT/src" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"Dir": "\(.*\)",*/\1/p')
  tag=$(sed -n 's/^TAG ?= *//p' "$src/build/pause/Makefile")
  log "building the pause image $tag from k8s.io/kubernetes@$K8S_VERSION build/pause/linux/pause.c"
  work=$(mktemp -d) && mkdir -p "$work/rootfs"
  gcc -Os -Wall -Werror -static -DVERSION="v$tag-sft" -o "$work/rootfs/pause" "$src/build/pause/linux/pause.c"
  strip "$work/rootfs/pause"
  python3 "$REPO/tools/sft_devcluster/oci.py" "$work/rootfs" "localhost/sft-node/pause:$tag" "$IMAGES/pause.tar" \
    --entrypoint /pause --user 65535:65535 >&2
  rm -rf "$work"
  built pause "$K8S_VERSION+$RECIPE"
}

# The tests' image: Debian's statically linked busybox and a link per applet.
build_busybox() {
  local work deb version
  work=$(mktemp -d)
  (cd "$work" && { apt-get download busybox-static >&2 || { apt-get update >&2 && apt-get download busybox-static >&2; }; })
  deb=$(ls "$work"/busybox-static_*.deb)
  version=$(dpkg-deb -f "$deb" Version)
  if ! stale busybox "$version+$RECIPE"; then rm -rf "$work"; return 0; fi
  log "building the busybox test image from Debian busybox-static $version"
  dpkg-deb -x "$deb" "$work/deb"
  mkdir -p "$work/rootfs/bin" "$work/rootfs/etc" "$work/rootfs/tmp" && chmod 1777 "$work/rootfs/tmp"
  cp "$work/deb/bin/busybox" "$work/rootfs/bin/busybox"
  local applet
  for applet in $("$work/rootfs/bin/busybox" --list); do
    [[ $applet == busybox ]] || ln -s busybox "$work/rootfs/bin/$applet"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$work/rootfs/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$work/rootfs/etc/group"
  local tag=${version#*:}  # Debian's epoch ("1:") can't be part of an image tag
  python3 "$REPO/tools/sft_devcluster/oci.py" "$work/rootfs" "localhost/sft-node/busybox:${tag%%-*}" \
    "$IMAGES/busybox.tar" --cmd /bin/sh >&2
  rm -rf "$work"
  built busybox "$version+$RECIPE"
}

start=$(date +%s)
bash "$REPO/scripts/host-tools.sh"
build_containerd
build_crictl
build_coredns
build_pause
build_busybox
for f in containerd ctr containerd-shim-runc-v2 crictl coredns; do [[ -x $BIN/$f ]]; done
[[ -s $IMAGES/pause.tar && -s $IMAGES/busybox.tar && -x $K8S_BIN/kubelet && -x $K8S_BIN/kube-proxy ]]
echo "$WANT" >"$MARKER"
log "complete in $(( $(date +%s) - start ))s: $(ls "$BIN" | tr '\n' ' ')$(ls "$IMAGES" | tr '\n' ' ')"
echo "$ROOT"
