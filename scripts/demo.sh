#!/usr/bin/env bash
# The main command: set up, generate the tiny offline model + data, and fine-tune it on this
# machine with the same spec format the operator uses. No cluster needed.
set -euo pipefail
cd "$(dirname "$0")/.."
SKIP_K8S=1 bash scripts/setup.sh
sftctl example-assets
sftctl validate examples/local-tiny.yaml
# A finished run would just be resumed (and stop at once); the demo trains from scratch each time.
rm -rf "$HOME/.cache/sft-operator/runs/local-tiny"
sftctl run examples/local-tiny.yaml
echo "outputs: ~/.cache/sft-operator/runs/local-tiny (model/, metrics.json, trainer_log.jsonl, loss.png)"
