#!/usr/bin/env bash
# Build (or reuse) Kueue's manager for the dev cluster (`sftctl dev-cluster up --kueue`, the Kueue tests).
#
#   scripts/kueue-bin.sh             # prints the Kueue dir on its last stdout line
#   KUEUE_VERSION=v0.17.0 scripts/kueue-bin.sh
#
# Lands in ${SFT_CACHE:-~/.cache/sft-operator}/kueue-<version>, outside the repo:
#   bin/kueue       the manager, `go install sigs.k8s.io/kueue/cmd/kueue@<version>` (Go module proxy)
#   crds/           its CustomResourceDefinitions, copied from the same module
#   webhooks.yaml   its webhook configurations (the dev cluster points them at loopback)
# Reuses the control plane's Go build cache: a few minutes warm, longer cold.
set -euo pipefail

KUEUE_VERSION=${KUEUE_VERSION:-v0.17.0}
CACHE=${SFT_CACHE:-$HOME/.cache/sft-operator}
ROOT=$CACHE/kueue-$KUEUE_VERSION
MARKER=$ROOT/.complete
MODULE=sigs.k8s.io/kueue

log() { echo "[kueue-bin $(date +%H:%M:%S)] $*" >&2; }
trap 'log "failed (exit $?) at line $LINENO: $BASH_COMMAND"' ERR

if [[ -f $MARKER && "$(cat "$MARKER")" == "$KUEUE_VERSION" ]]; then
  echo "$ROOT"
  exit 0
fi
command -v go >/dev/null || { log "go is not installed (need Go >= 1.25)"; exit 1; }
mkdir -p "$ROOT/bin" "$ROOT/src"
exec 9>"$ROOT/.lock"
flock 9
if [[ -f $MARKER && "$(cat "$MARKER")" == "$KUEUE_VERSION" ]]; then  # built meanwhile by whoever held the lock
  echo "$ROOT"
  exit 0
fi

export GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0
export GOCACHE=${GOCACHE_OVERRIDE:-$CACHE/gocache}
export GOBIN=$ROOT/bin
start=$(date +%s)
if ! info=$(cd "$ROOT/src" && go mod download -json "$MODULE@$KUEUE_VERSION" 2>&1); then
  log "cannot download $MODULE@$KUEUE_VERSION through the Go module proxy: $info"
  exit 1
fi
dir=$(echo "$info" | sed -n 's/.*"Dir": "\(.*\)",*/\1/p')
log "building $MODULE/cmd/kueue@$KUEUE_VERSION"
(cd "$ROOT/src" && go install -trimpath -ldflags "-s -w" "$MODULE/cmd/kueue@$KUEUE_VERSION" >&2)
rm -rf "$ROOT/crds" && mkdir -p "$ROOT/crds"
cp "$dir"/config/components/crd/bases/*.yaml "$ROOT/crds/"
install -m 0644 "$dir/config/components/webhook/manifests.yaml" "$ROOT/webhooks.yaml"
chmod -R u+w "$ROOT/crds"
[[ -x $ROOT/bin/kueue ]]
echo "$KUEUE_VERSION" >"$MARKER"
log "complete in $(( $(date +%s) - start ))s"
echo "$ROOT"
