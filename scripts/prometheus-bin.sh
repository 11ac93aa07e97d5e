#!/usr/bin/env bash
# Prometheus' server and promtool, from Debian's `prometheus` package (it ships both), unpacked once into
# ${SFT_CACHE:-~/.cache/sft-operator}/prometheus-<version> and reused; prints that folder on its last line.
#
#   dir=$(bash scripts/prometheus-bin.sh | tail -1); "$dir/prometheus" --version
#
# Used by scripts/alert-tests.sh (promtool) and tests/integration/test_prometheus_e2e.py (the server).
# `apt-get download` + `dpkg-deb -x`: nothing is installed, so no Prometheus service appears. About
# 2 seconds cold; building the two from their Go module took 15 min on 2 busy cores (BENCHMARKS.md).
set -euo pipefail
PROMETHEUS_DEB=${PROMETHEUS_DEB:-prometheus=2.42.0+ds-5+deb12u1}
CACHE=${SFT_CACHE:-$HOME/.cache/sft-operator}
DIR=$CACHE/prometheus-${PROMETHEUS_DEB#*=}
log() { echo "[prometheus-bin $(date +%H:%M:%S)] $*" >&2; }

if [[ ! -x $DIR/prometheus || ! -x $DIR/promtool ]]; then
  log "downloading Debian's $PROMETHEUS_DEB (once)"
  deb=$(mktemp -d)
  trap 'rm -rf "$deb"' EXIT
  # apt-get download refuses nothing as root; it only warns that _apt cannot read the folder.
  if ! (cd "$deb" && apt-get download "$PROMETHEUS_DEB" >&2 2>/dev/null || apt-get download "${PROMETHEUS_DEB%%=*}" >&2); then
    log "cannot download the Debian package ${PROMETHEUS_DEB%%=*} (apt-get download; run apt-get update?)"
    exit 1
  fi
  dpkg-deb -x "$deb"/prometheus_*.deb "$deb/root"
  # Installed side by side into a fresh folder, then moved: a run killed half-way leaves no half a cache.
  mkdir -p "$CACHE"
  staging=$(mktemp -d "$CACHE/.prometheus-XXXXXX") && chmod 0755 "$staging"
  install -m 0755 "$deb/root/usr/bin/prometheus" "$deb/root/usr/bin/promtool" "$staging/"
  rm -rf "$DIR"
  mv "$staging" "$DIR"
fi
echo "$DIR"
