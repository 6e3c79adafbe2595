#!/usr/bin/env bash
# The evaluation example: Jeopardy knowledge base + fine-tuned adapter, four arms compared,
# report in eval-report/report.html. Arguments go to `python -m clients.cli.eval_example`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m clients.cli.eval_example "$@"
