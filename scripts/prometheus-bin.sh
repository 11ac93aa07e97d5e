#!/usr/bin/env bash
# Build (or reuse) Prometheus' server and promtool from their Go module, for scripts/alert-tests.sh
# (promtool) and tests/integration/test_prometheus_e2e.py (the server, scraping the dev cluster).
#
#   dir=$(bash scripts/prometheus-bin.sh | tail -1); "$dir/prometheus" --version
#   PROMETHEUS_VERSION=v0.316.0 bash scripts/prometheus-bin.sh   # the module version of Prometheus 3.16.0
#
# Lands in ${SFT_CACHE:-~/.cache/sft-operator}/prometheus-<version>, outside the repo. Built with the
# module's own build tags `remove_all_sd,enable_kubernetes_sd`: Kubernetes service discovery (what a
# ServiceMonitor becomes) plus the always-built file and HTTP discovery, without the cloud providers'
# SDKs, which are most of a full build (15 min on 2 busy cores; this one ~3 min cold). No web UI
# assets (`builtinassets` needs npm); the HTTP API, which the tests use, is all there.
set -euo pipefail

PROMETHEUS_VERSION=${PROMETHEUS_VERSION:-v0.316.0}
CACHE=${SFT_CACHE:-$HOME/.cache/sft-operator}
DIR=$CACHE/prometheus-$PROMETHEUS_VERSION
MARKER=$DIR/.complete
MODULE=github.com/prometheus/prometheus
TAGS=remove_all_sd,enable_kubernetes_sd

log() { echo "[prometheus-bin $(date +%H:%M:%S)] $*" >&2; }
trap 'log "failed (exit $?) at line $LINENO: $BASH_COMMAND"' ERR

built() { [[ -f $MARKER && "$(cat "$MARKER")" == "$PROMETHEUS_VERSION $TAGS" ]]; }
if built; then
  echo "$DIR"
  exit 0
fi
command -v go >/dev/null || { log "go is not installed (need Go >= 1.25)"; exit 1; }
mkdir -p "$DIR/bin" "$DIR/src"
exec 9>"$DIR/.lock"
flock 9
if built; then  # built meanwhile by whoever held the lock (scripts/test.sh builds it beside the tests)
  echo "$DIR"
  exit 0
fi

export GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0
export GOCACHE=${GOCACHE_OVERRIDE:-$CACHE/gocache}
export GOBIN=$DIR/bin
start=$(date +%s)
version=github.com/prometheus/common/version
semver=$(cd "$DIR/src" && go mod download -json "$MODULE@$PROMETHEUS_VERSION" | sed -n 's/.*"Dir": "\(.*\)",*/\1/p')
semver=$(cat "$semver/VERSION")
log "building $MODULE/cmd/{prometheus,promtool}@$PROMETHEUS_VERSION (Prometheus $semver, tags $TAGS)"
(cd "$DIR/src" && go install -trimpath -tags "$TAGS" \
    -ldflags "-s -w -X $version.Version=$semver -X $version.Branch=$PROMETHEUS_VERSION" \
    "$MODULE/cmd/prometheus@$PROMETHEUS_VERSION" "$MODULE/cmd/promtool@$PROMETHEUS_VERSION" >&2)
# The tools directly in $DIR, as callers expect.
mv -f "$DIR/bin/prometheus" "$DIR/bin/promtool" "$DIR/"
rmdir "$DIR/bin"
"$DIR/prometheus" --version >/dev/null
echo "$PROMETHEUS_VERSION $TAGS" >"$MARKER"
log "complete in $(( $(date +%s) - start ))s"
echo "$DIR"
