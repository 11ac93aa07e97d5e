#!/usr/bin/env bash
# The main command: set up, generate the tiny offline model + data, and fine-tune it on this
# machine with the same spec format the operator uses. No cluster needed.
set -euo pipefail
cd "$(dirname "$0")/.."
SKIP_K8S=1 bash scripts/setup.sh
sftctl example-assets
sftctl validate examples/local-tiny.yaml
sftctl run examples/local-tiny.yaml
