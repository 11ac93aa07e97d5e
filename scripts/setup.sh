#!/usr/bin/env bash
# Install everything the project needs on this machine: the Python package with the trainer and
# dev extras (torch, transformers, peft, accelerate, trl, pytest, ...) into the current Python,
# the pinned control-plane binaries and what the dev cluster's real node runs (containerd,
# kubelet, CoreDNS, ...), built once into ~/.cache/sft-operator, and the host tools they run
# (scripts/host-tools.sh: nftables, iptables, runc, podman, ... with apt-get).
#
#   bash scripts/setup.sh            # Python packages + control-plane and node binaries
#   SKIP_K8S=1 bash scripts/setup.sh # Python packages only (enough for `sftctl run`)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
log() { echo "[setup $(date +%H:%M:%S)] $*" >&2; }

# pip is a no-op when everything is already satisfied, so rerunning is cheap.
stamp=${SFT_CACHE:-$HOME/.cache/sft-operator}/pip-$(cat pyproject.toml tools/pyproject.toml | sha256sum | cut -c1-16)
# The editable install must point at this checkout (CI clones into a new folder each run).
here=$(pwd -P)
installed_here() {
  "$PYTHON" - "$here" <<'PY' 2>/dev/null
import sys, pathlib
import sft_operator, sft_trainer, sft_devcluster, torch, transformers, kopf  # noqa: F401
root = pathlib.Path(sys.argv[1])
here = all(pathlib.Path(m.__file__).resolve().is_relative_to(root) for m in (sft_operator, sft_devcluster))
sys.exit(0 if here else 1)
PY
}
if [[ -f $stamp ]] && installed_here; then
  log "python packages: cached ($stamp)"
elif [[ -f $stamp ]] && "$PYTHON" -c "import torch, transformers, kopf" 2>/dev/null; then
  log "python packages: dependencies cached; pointing the editable install at $here"
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps -e . -e tools
else
  log "python packages: installing (first run downloads torch, a few GiB)"
  # tools/ holds the dev cluster (sft-devtools): installed here, never in the images.
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e ".[trainer,dev]" -e tools
  mkdir -p "$(dirname "$stamp")" && touch "$stamp"
fi

if [[ -z ${SKIP_K8S:-} ]]; then
  log "host tools (scripts/host-tools.sh): installing what is missing"
  bash scripts/host-tools.sh
  log "control-plane binaries: building or reusing (a cold build takes ~20-30 min on 2 cores)"
  bash scripts/k8s-bin.sh >/dev/null
  log "real node binaries: building or reusing (a cold build takes ~9 min on 2 cores)"
  bash scripts/node-bin.sh >/dev/null
fi
log "ready"
