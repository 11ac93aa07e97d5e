#!/usr/bin/env bash
# The whole test suite: unit, trainer and real-control-plane integration tests (Kueue's among them:
# scripts/kueue-bin.sh builds it), then the chart's Prometheus alert rules with promtool
# (scripts/alert-tests.sh). Sets up what is missing first; the integration fixtures start and stop the
# control plane. Fails if either part fails.
#
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh -m "not cluster"   # extra args go to pytest (the alert tests always run)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [[ $# -eq 0 ]]; then
  # The whole suite needs the images too. Building them (downloads, unpacking) overlaps well with the
  # Go builds of the control plane (CPU), which saves minutes on a cold machine; the image tests reuse them.
  SKIP_K8S=1 bash scripts/setup.sh
  bash scripts/host-tools.sh
  images_log=${SFT_CACHE:-$HOME/.cache/sft-operator}/images/build.log
  mkdir -p "$(dirname "$images_log")"
  bash scripts/build-images.sh all >/dev/null 2>"$images_log" &
  images=$!
  bash scripts/setup.sh
  # Kueue's manager, for the Kueue end-to-end test (tests/integration/test_kueue_e2e.py), which runs
  # among the last: built while the first tests run (its script's lock makes the test wait for it).
  kueue_log=${SFT_CACHE:-$HOME/.cache/sft-operator}/kueue-bin.log
  bash scripts/kueue-bin.sh >/dev/null 2>>"$kueue_log" &
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
