"""Builds the trainable model for each fine-tuning method and saves what it learned as safetensors.

- lora / dpo: PEFT LoRA on the chosen linear modules (vLLM serves these per request).
- ia3: PEFT IA3 rescaling vectors on k, v and down projections.
- prompt_tuning: PEFT prompt tuning, N learned virtual-token embeddings.
- selective: plain full fine-tuning of only the top N decoder layers; saved as those layers'
  weights (see services/trainer/selective.py for turning them into a full model folder).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from services.trainer.jobspec import JobSpec

SELECTIVE_WEIGHTS = "selective_layers.safetensors"
SELECTIVE_CONFIG = "selective_config.json"


def training_device() -> str:
    """The GPU when torch sees one (the GPU image), else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_base_model(model_dir: Path, device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)


def lora_config(spec: JobSpec):
    from peft import LoraConfig

    lora = spec.lora
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
        bias="none",
    )


def top_layer_indices(model, count: int) -> list[int]:
    total = model.config.num_hidden_layers
    return list(range(total - count, total))


def build_trainable_model(spec: JobSpec, base):
    """The model to train for a supervised method, with only the method's parameters trainable."""
    from peft import IA3Config, PromptTuningConfig, PromptTuningInit, get_peft_model

    if spec.method == "lora":
        return get_peft_model(base, lora_config(spec))
    if spec.method == "ia3":
        config = IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM"
        )
        return get_peft_model(base, config)
    if spec.method == "prompt_tuning":
        config = PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=spec.hyperparameters.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.RANDOM,
        )
        return get_peft_model(base, config)
    if spec.method == "selective":
        base.requires_grad_(False)
        for index in top_layer_indices(base, spec.hyperparameters.selective_top_layers):
            base.model.layers[index].requires_grad_(True)
        return base
    raise ValueError(f"no supervised model for method {spec.method!r}")


def trainable_fraction(model) -> float:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable / total


def save_artifact(spec: JobSpec, model, out_dir: Path, base_model_name: str) -> None:
    """Writes the learned parameters (safetensors only, never pickle) and their config into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if spec.method != "selective":
        model.save_pretrained(out_dir, safe_serialization=True)
        return
    from safetensors.torch import save_file

    layers = top_layer_indices(model, spec.hyperparameters.selective_top_layers)
    prefixes = tuple(f"model.layers.{i}." for i in layers)
    weights = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if n.startswith(prefixes)}
    save_file(weights, str(out_dir / SELECTIVE_WEIGHTS), metadata={"format": "pt"})
    (out_dir / SELECTIVE_CONFIG).write_text(
        json.dumps({"base_model": base_model_name, "layers": layers, "weights": SELECTIVE_WEIGHTS}, indent=2)
    )
