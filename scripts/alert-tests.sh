#!/usr/bin/env bash
# Unit-test the Helm chart's Prometheus alerts with promtool:
#   renders templates/prometheusrule.yaml, then `promtool check rules` and `promtool test rules`
#   with tests/alerts/*.test.yaml (series in, expected alerts out); also parses every query of
#   the Grafana dashboard (as recording rules, Grafana's variables filled in).
#
#   bash scripts/alert-tests.sh
#
# scripts/test.sh runs it after pytest. promtool comes from Debian's `prometheus` package, downloaded once
# and unpacked into ${SFT_CACHE:-~/.cache/sft-operator}/promtool-<version> (about a second; nothing is
# installed, so no Prometheus service appears). Building it from its Go module took 15 min on 2 busy cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PROMETHEUS_DEB=${PROMETHEUS_DEB:-prometheus=2.42.0+ds-5+deb12u1}
CACHE=${SFT_CACHE:-$HOME/.cache/sft-operator}
PROMTOOL_DIR=$CACHE/promtool-${PROMETHEUS_DEB#*=}
PYTHON=${PYTHON:-python3}
log() { echo "[alert-tests $(date +%H:%M:%S)] $*" >&2; }

if [[ ! -x $PROMTOOL_DIR/promtool ]]; then
  log "promtool: downloading Debian's $PROMETHEUS_DEB (once)"
  deb=$(mktemp -d)
  # apt-get download refuses nothing as root; it only warns that _apt cannot read the folder.
  if ! (cd "$deb" && apt-get download "$PROMETHEUS_DEB" >&2 2>/dev/null || apt-get download "${PROMETHEUS_DEB%%=*}" >&2); then
    log "cannot download the Debian package ${PROMETHEUS_DEB%%=*} (apt-get download; run apt-get update?)"
    exit 1
  fi
  dpkg-deb -x "$deb"/prometheus_*.deb "$deb/root"
  mkdir -p "$PROMTOOL_DIR"
  install -m 0755 "$deb/root/usr/bin/promtool" "$PROMTOOL_DIR/promtool"
  rm -rf "$deb"
fi

K8S_BIN=$(bash scripts/k8s-bin.sh | tail -1)
K8S_VERSION=$(basename "$(dirname "$K8S_BIN")"); K8S_VERSION=${K8S_VERSION#k8s-v}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$K8S_BIN/helm" template sft helm/sft-operator -n sft-system --kube-version "$K8S_VERSION" \
    --set prometheus.rules.enabled=true --show-only templates/prometheusrule.yaml |
  "$PYTHON" -c 'import sys, yaml; rule = yaml.safe_load(sys.stdin); yaml.safe_dump({"groups": rule["spec"]["groups"]}, sys.stdout, sort_keys=False)' \
  >"$work/rules.yaml"
# The dashboard's queries, with Grafana's variables filled in, must parse as PromQL too.
"$PYTHON" - helm/sft-operator/dashboards/sft-operator.json >"$work/dashboard-queries.yaml" <<'PY'
import json, sys, yaml
grafana = {"$__rate_interval": "5m", "$__range": "6h", "$namespace": ".*", "$sftjob": ".*"}
rules = []
for panel in json.load(open(sys.argv[1]))["panels"]:
    for target in panel.get("targets", []):
        expr = target["expr"]
        for var, value in grafana.items():
            expr = expr.replace(var, value)
        rules.append({"record": f"dashboard:panel_{panel['id']}_{target['refId'].lower()}", "expr": expr})
yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sys.stdout, sort_keys=False)
PY
cp tests/alerts/*.test.yaml "$work/"
"$PROMTOOL_DIR/promtool" check rules "$work/rules.yaml" "$work/dashboard-queries.yaml"
"$PROMTOOL_DIR/promtool" test rules "$work"/*.test.yaml
