#!/usr/bin/env bash
# The test command: sets everything up (idempotent), then runs the whole suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/test_foundation.py -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
