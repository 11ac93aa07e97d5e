#!/usr/bin/env bash
# Unit-test the Helm chart's Prometheus alerts with promtool:
#   renders templates/prometheusrule.yaml, then `promtool check rules` and `promtool test rules`
#   with tests/alerts/*.test.yaml (series in, expected alerts out); also parses every query of
#   the Grafana dashboard (as recording rules, Grafana's variables filled in).
#
#   bash scripts/alert-tests.sh
#
# scripts/test.sh runs it after pytest. promtool is built once from Prometheus' Go module by
# scripts/prometheus-bin.sh into ${SFT_CACHE:-~/.cache/sft-operator}/prometheus-<version> (~3 min cold).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PROMTOOL=$(bash scripts/prometheus-bin.sh | tail -1)/promtool

K8S_BIN=$(bash scripts/k8s-bin.sh | tail -1)
K8S_VERSION=$(basename "$(dirname "$K8S_BIN")"); K8S_VERSION=${K8S_VERSION#k8s-v}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$K8S_BIN/helm" template sft helm/sft-operator -n sft-system --kube-version "$K8S_VERSION" \
    --set prometheus.rules.enabled=true --show-only templates/prometheusrule.yaml |
  "$PYTHON" -c 'import sys, yaml; rule = yaml.safe_load(sys.stdin); yaml.safe_dump({"groups": rule["spec"]["groups"]}, sys.stdout, sort_keys=False)' \
  >"$work/rules.yaml"
# The dashboard's queries, with Grafana's variables filled in, must parse as PromQL too.
"$PYTHON" tests/dashboard_queries.py helm/sft-operator/dashboards/sft-operator.json >"$work/dashboard-queries.yaml"
cp tests/alerts/*.test.yaml "$work/"
"$PROMTOOL" check rules "$work/rules.yaml" "$work/dashboard-queries.yaml"
"$PROMTOOL" test rules "$work"/*.test.yaml
