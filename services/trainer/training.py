"""`TrainingRun`: the supervised training loop, with progress events, validation loss per epoch,
early stopping, and checkpoints (weights, optimizer, scheduler, RNG) it can resume from exactly."""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from services.trainer.jobspec import Hyperparameters
from services.trainer.rendering import IGNORE_INDEX, TokenizedExample

CHECKPOINT = "checkpoint"
# Validation loss must drop by more than this to count as an improvement for early stopping.
MIN_IMPROVEMENT = 1e-4


class Stopped(Exception):
    """Training stopped early: reason "cancel" (drop the job), "shutdown" (resume later, elsewhere) or
    "lost" (the lease ran out: another worker owns the job now)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class RunListener(Protocol):
    def progress(
        self, step: int, total_steps: int, epoch: float, loss: float, lr: float, tokens_per_second: float
    ) -> None: ...

    def epoch_end(self, epoch: int, train_loss: float, validation_loss: float | None) -> None: ...

    def checkpoint_saved(self, step: int) -> None: ...

    def note(self, message: str) -> None: ...


@dataclass(frozen=True)
class RunResult:
    train_loss: float
    validation_loss: float | None
    steps: int
    tokens_per_second: float


def collate(examples: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_scheduler(optimizer, schedule: str, total_steps: int):
    from transformers import get_scheduler

    return get_scheduler(schedule, optimizer, num_warmup_steps=0, num_training_steps=max(total_steps, 1))


class TrainingRun:
    """Trains `model` (only its parameters with requires_grad) on tokenized examples."""

    def __init__(
        self,
        model,
        train: list[TokenizedExample],
        validation: list[TokenizedExample],
        hp: Hyperparameters,
        work_dir: Path,
        listener: RunListener,
        should_stop: Callable[[], str | None],
        pad_id: int,
    ):
        self.model, self.train, self.validation, self.hp = model, train, validation, hp
        self.work_dir, self.listener, self.should_stop, self.pad_id = work_dir, listener, should_stop, pad_id
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=hp.learning_rate, weight_decay=0.0)
        batches = math.ceil(len(train) / hp.batch_size)
        self.steps_per_epoch = max(1, math.ceil(batches / hp.gradient_accumulation))
        total = self.steps_per_epoch * hp.epochs
        self.total_steps = min(total, hp.max_steps) if hp.max_steps else total
        self.scheduler = make_scheduler(self.optimizer, hp.lr_schedule, self.total_steps)
        self.state = {
            "step": 0,
            "epoch_losses": [],
            "epoch_step_losses": [],
            "best_val": None,
            "bad_epochs": 0,
            "last_val": None,
            "tokens": 0,
            "train_seconds": 0.0,
            "stopped_early": False,
        }

    def _epoch_batches(self, epoch: int) -> list[list[TokenizedExample]]:
        # The order depends only on seed and epoch, so a resumed run sees the same batches.
        order = list(range(len(self.train)))
        random.Random(self.hp.seed * 1_000_003 + epoch).shuffle(order)
        size = self.hp.batch_size
        return [[self.train[i] for i in order[k : k + size]] for k in range(0, len(order), size)]

    # -- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        from safetensors.torch import save_file

        staging = self.work_dir / (CHECKPOINT + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_file(
            {n: p.detach().cpu().contiguous() for n, p in self.params.items()}, str(staging / "trainable.safetensors")
        )
        torch.save(
            {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate(),
            },
            staging / "state.pt",
        )
        (staging / "progress.json").write_text(json.dumps(self.state))
        final, old = self.work_dir / CHECKPOINT, self.work_dir / (CHECKPOINT + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        staging.rename(final)  # the switch: a crash before it leaves the old checkpoint (or .old) intact
        shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self) -> bool:
        from safetensors.torch import load_file

        folder = self.work_dir / CHECKPOINT
        if not folder.exists() and (self.work_dir / (CHECKPOINT + ".old")).exists():
            folder = self.work_dir / (CHECKPOINT + ".old")
        if not (folder / "progress.json").exists():
            return False
        weights = load_file(str(folder / "trainable.safetensors"))
        if set(weights) != set(self.params):
            raise ValueError("checkpoint does not match the model being trained")
        with torch.no_grad():
            for name, tensor in weights.items():
                self.params[name].copy_(tensor)
        saved = torch.load(folder / "state.pt", weights_only=False)  # our own file, written above
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
        random.setstate(saved["python_rng"])
        self.state = json.loads((folder / "progress.json").read_text())
        return True

    # -- the loop ----------------------------------------------------------------------------

    def _check_stop(self) -> None:
        reason = self.should_stop()
        if reason:
            raise Stopped(reason)

    def validation_loss(self) -> float | None:
        if not self.validation:
            return None
        self.model.eval()
        total, weight = 0.0, 0
        with torch.no_grad():
            for k in range(0, len(self.validation), self.hp.batch_size):
                batch = self._on_device(collate(self.validation[k : k + self.hp.batch_size], self.pad_id))
                tokens = int((batch["labels"] != IGNORE_INDEX).sum())
                total += float(self.model(**batch).loss) * tokens
                weight += tokens
        self.model.train()
        return total / max(weight, 1)

    def _on_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = next(iter(self.params.values())).device
        return {k: v.to(device) for k, v in batch.items()}

    def _step(self, micro_batches: list[list[TokenizedExample]]) -> float:
        loss_sum = 0.0
        for examples in micro_batches:
            self._check_stop()
            batch = self._on_device(collate(examples, self.pad_id))
            loss = self.model(**batch).loss / len(micro_batches)
            loss.backward()
            loss_sum += float(loss.detach())
            self.state["tokens"] += int(batch["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(list(self.params.values()), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum

    def run(self) -> RunResult:
        if self.load_checkpoint():
            self.listener.note(f"resumed from the checkpoint at step {self.state['step']}")
        self.model.train()
        state, accum = self.state, self.hp.gradient_accumulation
        while state["step"] < self.total_steps and not state["stopped_early"]:
            epoch, done_in_epoch = divmod(state["step"], self.steps_per_epoch)
            batches = self._epoch_batches(epoch)
            for step_in_epoch in range(done_in_epoch, self.steps_per_epoch):
                started = time.perf_counter()
                lr = self.scheduler.get_last_lr()[0]
                loss = self._step(batches[step_in_epoch * accum : (step_in_epoch + 1) * accum])
                state["train_seconds"] += time.perf_counter() - started
                state["step"] += 1
                state["epoch_step_losses"].append(loss)
                tps = state["tokens"] / max(state["train_seconds"], 1e-9)
                self.listener.progress(
                    state["step"], self.total_steps, epoch + (step_in_epoch + 1) / self.steps_per_epoch, loss, lr, tps
                )
                if step_in_epoch + 1 == self.steps_per_epoch:
                    self._end_epoch(epoch + 1)
                if state["step"] % self.hp.checkpoint_every_steps == 0 and state["step"] < self.total_steps:
                    self.save_checkpoint()
                    self.listener.checkpoint_saved(state["step"])
                if state["step"] >= self.total_steps or state["stopped_early"]:
                    break
        if state["epoch_step_losses"]:  # max_steps ended inside an epoch: close it for the metrics
            self._end_epoch(state["step"] // self.steps_per_epoch + 1)
        return RunResult(
            train_loss=state["epoch_losses"][-1] if state["epoch_losses"] else float("nan"),
            validation_loss=state["last_val"],
            steps=state["step"],
            tokens_per_second=state["tokens"] / max(state["train_seconds"], 1e-9),
        )

    def _end_epoch(self, epoch: int) -> None:
        state = self.state
        losses = state["epoch_step_losses"]
        train_loss = sum(losses) / len(losses)
        state["epoch_losses"].append(train_loss)
        state["epoch_step_losses"] = []
        val = self.validation_loss()
        state["last_val"] = val
        self.listener.epoch_end(epoch, train_loss, val)
        patience = self.hp.early_stopping_patience
        if val is None or not patience:
            return
        if state["best_val"] is None or val < state["best_val"] - MIN_IMPROVEMENT:
            state["best_val"], state["bad_epochs"] = val, 0
        else:
            state["bad_epochs"] += 1
            if state["bad_epochs"] >= patience:
                state["stopped_early"] = True
                self.listener.note(
                    f"early stopping after epoch {epoch}: validation loss has not improved for {patience} epochs"
                )
