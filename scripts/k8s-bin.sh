#!/usr/bin/env bash
# Build (or reuse) the pinned binaries of the local test/dev control plane.
#
#   scripts/k8s-bin.sh            # prints the bin dir on its last stdout line
#   K8S_VERSION=v1.35.4 scripts/k8s-bin.sh
#
# Everything lands in ${SFT_CACHE:-~/.cache/sft-operator}/k8s-<version>/bin, outside
# the repo, and is built from Go modules through the Go module proxy (no Docker,
# no release tarballs):
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl,
#   kubelet, kube-proxy  (k8s.io/kubernetes, one `go build`; the node's two are used by
#                         the dev cluster's real node, see scripts/node-bin.sh)
#   etcd        (go.etcd.io/etcd/server/v3 at the version that Kubernetes release pins)
#   kwok, helm, kubeconform  (go install)
# Idempotent: each binary is built once; a marker records a complete set (a cache made
# before a binary joined the set gets just that one added).
# Build logs go to stderr so that stdout stays machine-readable.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.36.3}
KWOK_VERSION=${KWOK_VERSION:-v0.8.0}
HELM_VERSION=${HELM_VERSION:-v3.22.0}
KUBECONFORM_VERSION=${KUBECONFORM_VERSION:-v0.7.0}
K8S_CMDS=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy)

CACHE=${SFT_CACHE:-$HOME/.cache/sft-operator}
ROOT=$CACHE/k8s-$K8S_VERSION
BIN=$ROOT/bin
MARKER=$BIN/.complete
WANT="k8s=$K8S_VERSION($(IFS=,; echo "${K8S_CMDS[*]}")) kwok=$KWOK_VERSION helm=$HELM_VERSION kubeconform=$KUBECONFORM_VERSION"

log() { echo "[k8s-bin $(date +%H:%M:%S)] $*" >&2; }
trap 'log "failed (exit $?) at line $LINENO: $BASH_COMMAND"' ERR

if [[ -f $MARKER && "$(cat "$MARKER")" == "$WANT" ]]; then
  echo "$BIN"
  exit 0
fi

command -v go >/dev/null || { log "go is not installed (need Go >= 1.26)"; exit 1; }
mkdir -p "$BIN" "$ROOT/src"

# One build at a time per version (the test fixture and a developer may race).
exec 9>"$ROOT/.lock"
flock 9

export GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0
export GOCACHE=${GOCACHE_OVERRIDE:-$CACHE/gocache}
export GOBIN=$BIN
GO_BUILD_FLAGS=(-trimpath -tags selinux,notest)

# Path of the go.mod of module $1 at version $2, downloaded through the Go module proxy.
gomod_of() {
  local out
  if ! out=$(cd "$ROOT/src" && go mod download -json "$1@$2" 2>&1); then
    log "cannot download $1@$2 through the Go module proxy: $(echo "$out" | sed -n 's/.*"Error": "\(.*\)".*/\1/p')"
    return 1
  fi
  echo "$out" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p'
}

# Writes a wrapper module in $1 that requires module $2@$3 and replaces every
# requirement of that module pinned at v0.0.0 (Kubernetes' staging repos) with $4.
# The list is read from the module's own go.mod, never typed out here.
make_wrapper() {
  local dir=$1 mod=$2 ver=$3 staging_ver=${4:-}
  local gomod
  gomod=$(gomod_of "$mod" "$ver")
  mkdir -p "$dir"
  {
    echo "module sft.dev/k8s-bin-wrapper"
    echo
    echo "go $(go env GOVERSION | sed 's/^go//; s/^\([0-9]*\.[0-9]*\).*/\1/').0"
    echo
    echo "require $mod $ver"
    if [[ -n $staging_ver ]]; then
      echo
      echo "replace ("
      awk -v v="$staging_ver" '$2 == "v0.0.0" && $1 ~ /^k8s\.io\// {print "\t" $1 " => " $1 " " v}' "$gomod" | sort -u
      echo ")"
    fi
  } >"$dir/go.mod"
  echo "$gomod"
}

build_kubernetes() {
  local minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  local staging="v0.${K8S_VERSION#v1.}"
  local dir=$ROOT/src/kubernetes
  # Only the missing ones: on a cold cache that is all of them in one `go build`, which
  # compiles their shared packages once.
  local cmds=() c
  for c in "${K8S_CMDS[@]}"; do [[ -x $BIN/$c ]] || cmds+=("$c"); done
  [[ ${#cmds[@]} -eq 0 ]] && return 0
  log "building ${cmds[*]} $K8S_VERSION (staging modules at $staging)"
  make_wrapper "$dir" k8s.io/kubernetes "$K8S_VERSION" "$staging" >/dev/null
  log "wrapper go.mod replaces $(grep -c '=>' "$dir/go.mod") k8s.io staging modules"
  local pkgs=()
  for c in "${cmds[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$c"); done
  local ld=""
  local p
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    ld+=" -X $p.gitTreeState=clean -X $p.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  done
  (cd "$dir" && go get "${pkgs[@]/%/@$K8S_VERSION}" >&2 &&
    go build "${GO_BUILD_FLAGS[@]}" -ldflags "-s -w $ld" -o "$BIN/" "${pkgs[@]}" >&2)
}

build_etcd() {
  [[ -x $BIN/etcd ]] && return 0
  local gomod
  gomod=$(gomod_of k8s.io/kubernetes "$K8S_VERSION")
  local ver
  ver=$(awk '$1 == "go.etcd.io/etcd/server/v3" {print $2; exit}' "$gomod")
  [[ -n $ver ]] || { log "k8s.io/kubernetes@$K8S_VERSION does not pin go.etcd.io/etcd/server/v3"; return 1; }
  log "building etcd $ver (pinned by k8s.io/kubernetes $K8S_VERSION)"
  # etcd's server module carries replace directives, so `go install pkg@v` refuses it:
  # build it from a wrapper module instead.
  local dir=$ROOT/src/etcd
  make_wrapper "$dir" go.etcd.io/etcd/server/v3 "$ver" >/dev/null
  (cd "$dir" && go get "go.etcd.io/etcd/server/v3@$ver" >&2 &&
    go build "${GO_BUILD_FLAGS[@]}" -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3 >&2)
}

go_install() { # name package version
  [[ -x $BIN/$1 ]] && return 0
  log "go install $2@$3"
  (cd "$ROOT/src" && go install -trimpath -ldflags "-s -w" "$2@$3" >&2)
}

all_present() { local c; for c in "$@"; do [[ -x $BIN/$c ]] || return 1; done; }

start=$(date +%s)
build_etcd
go_install kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_VERSION"
go_install kubeconform github.com/yannh/kubeconform/cmd/kubeconform "$KUBECONFORM_VERSION"
go_install helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION"
build_kubernetes
all_present etcd kwok kubeconform helm "${K8S_CMDS[@]}"
echo "$WANT" >"$MARKER"
log "complete in $(( $(date +%s) - start ))s: $(ls "$BIN" | tr '\n' ' ')"
echo "$BIN"
