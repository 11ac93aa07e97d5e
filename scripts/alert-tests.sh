#!/usr/bin/env bash
# Unit-test the Helm chart's Prometheus alerts with promtool:
#   renders templates/prometheusrule.yaml, then `promtool check rules` and `promtool test rules`
#   with tests/alerts/*.test.yaml (series in, expected alerts out).
#
#   bash scripts/alert-tests.sh
#
# promtool is built once from its Go module into ${SFT_CACHE:-~/.cache/sft-operator}/promtool-<version>
# (about 15 minutes cold on 2 cores, which is why scripts/test.sh does not run this by default).
set -euo pipefail
cd "$(dirname "$0")/.."
PROMETHEUS_VERSION=${PROMETHEUS_VERSION:-v0.316.0}
CACHE=${SFT_CACHE:-$HOME/.cache/sft-operator}
PROMTOOL_DIR=$CACHE/promtool-$PROMETHEUS_VERSION
PYTHON=${PYTHON:-python3}
log() { echo "[alert-tests $(date +%H:%M:%S)] $*" >&2; }

if [[ ! -x $PROMTOOL_DIR/promtool ]]; then
  log "building promtool $PROMETHEUS_VERSION (once)"
  GOBIN=$PROMTOOL_DIR GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0 GOCACHE=$CACHE/gocache \
    go install -trimpath -ldflags "-s -w" "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_VERSION" >&2
fi

K8S_BIN=$(bash scripts/k8s-bin.sh | tail -1)
K8S_VERSION=$(basename "$(dirname "$K8S_BIN")"); K8S_VERSION=${K8S_VERSION#k8s-v}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$K8S_BIN/helm" template sft helm/sft-operator -n sft-system --kube-version "$K8S_VERSION" \
    --set prometheus.rules.enabled=true --show-only templates/prometheusrule.yaml |
  "$PYTHON" -c 'import sys, yaml; rule = yaml.safe_load(sys.stdin); yaml.safe_dump({"groups": rule["spec"]["groups"]}, sys.stdout, sort_keys=False)' \
  >"$work/rules.yaml"
cp tests/alerts/*.test.yaml "$work/"
"$PROMTOOL_DIR/promtool" check rules "$work/rules.yaml"
"$PROMTOOL_DIR/promtool" test rules "$work"/*.test.yaml
