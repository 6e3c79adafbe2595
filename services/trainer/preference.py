"""DPO through trl's DPOTrainer, producing a LoRA adapter; progress, validation loss, cancellation
and checkpoints (trl's own, resumable) are bridged to the same listener as supervised runs."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from services.trainer.jobspec import JobSpec
from services.trainer.methods import lora_config
from services.trainer.training import RunListener, RunResult, Stopped

HF_CHECKPOINTS = "dpo-checkpoints"


def _latest_checkpoint(folder: Path) -> Path | None:
    found = [
        p
        for p in folder.glob("checkpoint-*")
        if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").exists()
    ]
    return max(found, key=lambda p: int(p.name.split("-")[-1])) if found else None


def run_dpo(
    spec: JobSpec,
    base,
    tokenizer,
    train: list[dict],
    validation: list[dict],
    work_dir: Path,
    listener: RunListener,
    should_stop: Callable[[], str | None],
):
    """Trains a LoRA adapter with DPO; returns (peft model, RunResult). Raises Stopped when asked to stop."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    hp = spec.hyperparameters
    steps_per_epoch = max(1, math.ceil(math.ceil(len(train) / hp.batch_size) / hp.gradient_accumulation))
    total_steps = min(steps_per_epoch * hp.epochs, hp.max_steps) if hp.max_steps else steps_per_epoch * hp.epochs
    stop_reason: list[str] = []
    epoch_losses: list[float] = []
    step_losses: list[float] = []
    eval_losses: list[float] = []

    class Bridge(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            reason = should_stop()
            if reason:
                stop_reason.append(reason)
                control.should_training_stop = True
                control.should_save = False
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" in logs and "eval_loss" not in logs:
                step_losses.append(float(logs["loss"]))
                listener.progress(
                    state.global_step,
                    total_steps,
                    float(state.epoch or 0),
                    float(logs["loss"]),
                    float(logs.get("learning_rate", 0.0)),
                    0.0,
                )
            if "eval_loss" in logs:
                loss = sum(step_losses) / len(step_losses) if step_losses else float("nan")
                epoch_losses.append(loss)
                eval_losses.append(float(logs["eval_loss"]))
                step_losses.clear()
                listener.epoch_end(round(state.epoch or 0), loss, eval_losses[-1])

        def on_save(self, args, state, control, **kwargs):
            listener.checkpoint_saved(state.global_step)

    def records(items):
        return Dataset.from_list(
            [{"prompt": e["prompt"], "chosen": e["chosen"], "rejected": e["rejected"]} for e in items]
        )

    checkpoints = work_dir / HF_CHECKPOINTS
    config = DPOConfig(
        output_dir=str(checkpoints),
        beta=hp.dpo_beta,
        learning_rate=hp.learning_rate,
        lr_scheduler_type=hp.lr_schedule,
        per_device_train_batch_size=hp.batch_size,
        per_device_eval_batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation,
        num_train_epochs=hp.epochs,
        max_steps=hp.max_steps or -1,
        max_length=hp.max_seq_len,
        seed=hp.seed,
        data_seed=hp.seed,
        logging_steps=1,
        save_strategy="steps",
        save_steps=hp.checkpoint_every_steps,
        save_total_limit=1,
        eval_strategy="epoch" if validation else "no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=True,
        dataset_num_proc=None,
        warmup_steps=0,
        max_grad_norm=1.0,
    )
    trainer = DPOTrainer(
        model=base,
        args=config,
        train_dataset=records(train),
        eval_dataset=records(validation) if validation else None,
        processing_class=tokenizer,
        peft_config=lora_config(spec),
        callbacks=[Bridge()],
    )
    resume = _latest_checkpoint(checkpoints)
    if resume is not None:
        listener.note(f"resumed from the checkpoint at step {resume.name.split('-')[-1]}")
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if stop_reason:
        raise Stopped(stop_reason[0])
    if step_losses:
        epoch_losses.append(sum(step_losses) / len(step_losses))
    # Each pair runs the prompt twice (with each answer), through the policy and the reference.
    columns = trainer.train_dataset
    epoch_tokens = sum(
        2 * len(p) + len(c) + len(r)
        for p, c, r in zip(columns["prompt_ids"], columns["chosen_ids"], columns["rejected_ids"])
    )
    tokens = epoch_tokens * trainer.state.global_step / steps_per_epoch
    result = RunResult(
        train_loss=epoch_losses[-1] if epoch_losses else float(output.training_loss),
        validation_loss=eval_losses[-1] if eval_losses else None,
        steps=trainer.state.global_step,
        tokens_per_second=tokens / max(float(output.metrics.get("train_runtime", 0.0)), 1e-9),
    )
    return trainer.model, result
