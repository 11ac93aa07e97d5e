#!/usr/bin/env bash
# The whole test suite: unit, trainer and real-control-plane integration tests (Kueue's and
# Prometheus' among them: scripts/kueue-bin.sh and scripts/prometheus-bin.sh build them), then the
# chart's Prometheus alert rules with promtool (scripts/alert-tests.sh). Sets up what is missing
# first; the integration fixtures start and stop the control plane. Fails if either part fails.
#
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh -m "not cluster"   # extra args go to pytest (the alert tests always run)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# pytest exits 5 when a selection collects no test; a filtered run with nothing to do is not a failure.
pytest_status() { local rc=$1; [[ $rc -eq 5 ]] && { echo "no tests collected for this selection"; rc=0; }; return "$rc"; }

status=0
if [[ $# -eq 0 ]]; then
  # On a cold machine the setup steps overlap: the images (downloads, unpacking) and pip (torch's
  # download) beside the Go builds of the control plane and the node (CPU), and the tests that need
  # neither a cluster nor the images beside those builds once pip is done (they fill the cores the
  # builds leave idle while they download and link, though they slow the builds too: about a minute
  # saved cold, BENCHMARKS.md). Warm, each build is a cache check and the two tiers run one after the other.
  bash scripts/host-tools.sh
  cache=${SFT_CACHE:-$HOME/.cache/sft-operator}
  images_log=$cache/images/build.log
  mkdir -p "$(dirname "$images_log")"
  bash scripts/build-images.sh all >/dev/null 2>"$images_log" &
  images=$!
  { bash scripts/k8s-bin.sh >/dev/null && bash scripts/node-bin.sh >/dev/null; } &
  binaries=$!
  SKIP_K8S=1 bash scripts/setup.sh
  first_log=$(mktemp /tmp/sft-tests-first-tier.XXXXXX.log)
  echo "tests without a cluster or images: running beside the builds (output below when done; log $first_log)"
  "$PYTHON" -m pytest tests -m "not cluster and not images" >"$first_log" 2>&1 &
  first=$!
  if ! wait "$binaries"; then
    echo "scripts/k8s-bin.sh or scripts/node-bin.sh failed (their log lines are above)" >&2
    kill "$first" 2>/dev/null || true
    exit 1
  fi
  bash scripts/setup.sh  # everything is in place now: this checks it
  # Prometheus (server and promtool) and Kueue's manager, for their end-to-end tests on the real node
  # and the alert tests, which run among the last: built one after the other while the tests run
  # (each script's lock makes a test that needs it wait for it).
  { bash scripts/prometheus-bin.sh >/dev/null 2>>"$cache/prometheus-bin.log"
    bash scripts/kueue-bin.sh >/dev/null 2>>"$cache/kueue-bin.log"; } &
  if ! wait "$images"; then
    tail -n 30 "$images_log" >&2
    echo "scripts/build-images.sh failed (log $images_log)" >&2
    kill "$first" 2>/dev/null || true
    exit 1
  fi
  rc=0; wait "$first" || rc=$?
  cat "$first_log" && rm -f "$first_log"
  pytest_status "$rc" || status=$?
  rc=0; "$PYTHON" -m pytest tests -m "cluster or images" || rc=$?
  pytest_status "$rc" || status=$?
else
  bash scripts/setup.sh
  rc=0; "$PYTHON" -m pytest tests "$@" || rc=$?
  pytest_status "$rc" || status=$?
fi
alerts=0
bash scripts/alert-tests.sh || alerts=$?
if [[ $alerts -ne 0 ]]; then
  echo "scripts/alert-tests.sh failed (exit $alerts): the alert rules or their promtool tests" >&2
  [[ $status -ne 0 ]] || status=$alerts
fi
exit $status
