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
if [[ $# -eq 0 ]]; then
  # On a cold machine the setup steps overlap: the images (downloads, unpacking) and pip (torch's
  # download) beside the Go builds of the control plane and the node (CPU). Minutes saved; warm, each
  # step is a cache check. The image tests reuse the images.
  bash scripts/host-tools.sh
  images_log=${SFT_CACHE:-$HOME/.cache/sft-operator}/images/build.log
  mkdir -p "$(dirname "$images_log")"
  bash scripts/build-images.sh all >/dev/null 2>"$images_log" &
  images=$!
  { bash scripts/k8s-bin.sh >/dev/null && bash scripts/node-bin.sh >/dev/null; } &
  binaries=$!
  SKIP_K8S=1 bash scripts/setup.sh
  if ! wait "$binaries"; then
    echo "scripts/k8s-bin.sh or scripts/node-bin.sh failed (their log lines are above)" >&2
    exit 1
  fi
  bash scripts/setup.sh  # everything is in place now: this checks it
  # Prometheus (server and promtool) and Kueue's manager, for their end-to-end tests on the real node
  # and the alert tests, which run among the last: built one after the other while the first tests
  # run (each script's lock makes a test that needs it wait for it).
  cache=${SFT_CACHE:-$HOME/.cache/sft-operator}
  { bash scripts/prometheus-bin.sh >/dev/null 2>>"$cache/prometheus-bin.log"
    bash scripts/kueue-bin.sh >/dev/null 2>>"$cache/kueue-bin.log"; } &
  if ! wait "$images"; then
    tail -n 30 "$images_log" >&2
    echo "scripts/build-images.sh failed (log $images_log)" >&2
    exit 1
  fi
else
  bash scripts/setup.sh
fi

status=0
"$PYTHON" -m pytest tests "$@" || status=$?
# pytest exits 5 when a selection collects no test; a filtered run with nothing to do is not a failure.
if [[ $status -eq 5 ]]; then
  echo "no tests collected for this selection"
  status=0
fi
alerts=0
bash scripts/alert-tests.sh || alerts=$?
if [[ $alerts -ne 0 ]]; then
  echo "scripts/alert-tests.sh failed (exit $alerts): the alert rules or their promtool tests" >&2
  [[ $status -ne 0 ]] || status=$alerts
fi
exit $status
