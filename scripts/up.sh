#!/usr/bin/env bash
# The main command: sets everything up (idempotent), starts the four services, waits until each
# is SERVING and runs the demo. Ctrl-C stops the services. Pass --exit to stop after the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/ragtune up --demo "$@"
