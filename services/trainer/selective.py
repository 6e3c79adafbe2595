"""Turns a selective fine-tuning artifact (the top layers' new weights) into a full model folder
that transformers and vLLM load as a model of its own: the base weights with those layers replaced.

Selectively fine-tuned layers cannot be swapped per request like a LoRA adapter, so the
generator serves one by pointing a model path at the folder this writes.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from services.trainer.methods import SELECTIVE_CONFIG


def materialize_full_model(artifact_dir: Path, base_dir: Path, out_dir: Path) -> Path:
    """Writes <out_dir> (atomically) holding the base model's config and tokenizer and a
    model.safetensors whose selected layers come from the artifact."""
    from safetensors.torch import load_file, save_file

    config = json.loads((artifact_dir / SELECTIVE_CONFIG).read_text())
    trained = load_file(str(artifact_dir / config["weights"]))
    weights = load_file(str(base_dir / "model.safetensors"))
    unknown = sorted(set(trained) - set(weights))
    if unknown:
        raise ValueError(f"artifact has weights the base model lacks: {unknown[:3]}")
    weights.update(trained)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".materialize-", dir=out_dir.parent))
    try:
        for item in base_dir.iterdir():
            if item.is_file() and item.name != "model.safetensors":
                shutil.copy2(item, staging / item.name)
        save_file(weights, str(staging / "model.safetensors"), metadata={"format": "pt"})
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
