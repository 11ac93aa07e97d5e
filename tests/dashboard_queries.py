"""The Grafana dashboard's queries with Grafana's variables filled in, for scripts/alert-tests.sh (promtool
parses them) and tests/integration/test_prometheus_e2e.py (a real Prometheus answers them).

    python3 tests/dashboard_queries.py helm/sft-operator/dashboards/sft-operator.json   # as a rule file
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

DASHBOARD = Path(__file__).resolve().parents[1] / "helm" / "sft-operator" / "dashboards" / "sft-operator.json"
# Every namespace and job; windows as wide as a dashboard showing the last 6 hours would use.
GRAFANA = {"$__rate_interval": "5m", "$__range": "6h", "$namespace": ".*", "$sftjob": ".*"}


def queries(path: Path = DASHBOARD) -> list[dict]:
    """[{"panel": id, "title": ..., "ref": refId, "expr": PromQL, "instant": bool}, ...] in the dashboard's order;
    an instant query is asked at the end of the dashboard's time range, the others over all of it."""
    out = []
    for panel in json.loads(Path(path).read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in GRAFANA.items():
                expr = expr.replace(var, value)
            out.append({"panel": panel["id"], "title": panel.get("title", ""), "ref": target["refId"], "expr": expr,
                        "instant": bool(target.get("instant"))})
    return out


def as_rule_file(path: Path = DASHBOARD) -> dict:
    """The queries as recording rules, so that `promtool check rules` parses each."""
    rules = [{"record": f"dashboard:panel_{q['panel']}_{q['ref'].lower()}", "expr": q["expr"]} for q in queries(path)]
    return {"groups": [{"name": "dashboard", "rules": rules}]}


if __name__ == "__main__":
    yaml.safe_dump(as_rule_file(Path(sys.argv[1]) if len(sys.argv) > 1 else DASHBOARD), sys.stdout, sort_keys=False)
