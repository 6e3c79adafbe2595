"""`JobRunner`: a queue of jobs trained by worker threads (one at a time by default): validate,
train, publish to the adapter registry; cancellation at the next step; on restart, unfinished
jobs are queued again and resume from their last checkpoint."""

from __future__ import annotations

import logging
import os
import queue
import random
import resource
import shutil
import threading
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from ragtune.errors import FailedPrecondition, ResourceExhausted
from ragtune.models import BASE_MODEL_NAME
from ragtune.registry import AdapterRegistry
from services.trainer import jobs as states
from services.trainer.datasets import DatasetStore, DatasetValidator, Problem, file_digest
from services.trainer.jobs import JobRecord, JobStore
from services.trainer.jobspec import JobSpec
from services.trainer.training import Stopped

log = logging.getLogger(__name__)

SUPERVISED_FORMATS = ("chat", "prompt_completion", "instruction")
SNAPSHOT = "dataset.jsonl"


class _EventRecorder:
    """The training listener: every event goes to the job's row in the store."""

    def __init__(self, store: JobStore, job_id: str):
        self.store, self.job_id = store, job_id

    def progress(self, step, total_steps, epoch, loss, lr, tokens_per_second):
        self.store.record(
            self.job_id,
            "progress",
            {
                "step": step,
                "total_steps": total_steps,
                "epoch": epoch,
                "train_loss": loss,
                "learning_rate": lr,
                "tokens_per_second": tokens_per_second,
            },
            step=step,
            total_steps=total_steps,
        )

    def epoch_end(self, epoch, train_loss, validation_loss):
        self.store.record(
            self.job_id, "epoch_end", {"epoch": epoch, "train_loss": train_loss, "validation_loss": validation_loss}
        )

    def checkpoint_saved(self, step):
        self.store.record(self.job_id, "checkpoint_saved", {"step": step})

    def note(self, message):
        self.store.record(self.job_id, "message", {"text": message})


def split_examples(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    order = list(examples)
    random.Random(seed).shuffle(order)
    held_out = max(1, int(len(order) * fraction)) if fraction > 0 and len(order) >= 2 else 0
    return order[held_out:], order[:held_out]


class JobRunner:
    def __init__(
        self,
        store: JobStore,
        datasets: DatasetStore,
        registry: AdapterRegistry,
        *,
        work_root: Path,
        model_dir: Path,
        min_examples: int,
        max_queued: int,
        workers: int = 1,
    ):
        self.store, self.datasets, self.registry = store, datasets, registry
        self.work_root, self.model_dir = work_root, model_dir
        self.min_examples, self.max_queued, self.workers = min_examples, max_queued, workers
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._lock = threading.Lock()
        self._cancelled: set[str] = set()
        self._publishing: set[str] = set()
        self._shutdown = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        for job in self.store.unfinished():
            if job.cancel_requested:
                self._finish_cancelled(job.id)
            else:
                self._queue.put(job.id)
        for i in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"trainer-worker-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 120.0) -> None:
        """Stops the running jobs at their next step, leaving them to resume on the next start."""
        self._shutdown.set()
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout)

    def work_dir(self, job_id: str) -> Path:
        return self.work_root / job_id

    # -- requests ----------------------------------------------------------------------------

    def create(self, tenant: str, spec: JobSpec, client_request_id: str) -> JobRecord:
        source = self.datasets.get(tenant, spec.dataset, "spec.dataset")
        if client_request_id:
            existing = [j for j in self.store.list(tenant) if j.client_request_id == client_request_id]
            if existing:
                return existing[0]
        if self.store.count_waiting() >= self.max_queued:
            raise ResourceExhausted(f"{self.max_queued} jobs are already waiting; retry later")
        job, created = self.store.create(tenant, spec.to_dict(), client_request_id)
        if created:
            # Train on the dataset as it is now, even if it is uploaded again before the job runs.
            work = self.work_dir(job.id)
            try:
                work.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(source, work / SNAPSHOT)
                except OSError:
                    shutil.copyfile(source, work / SNAPSHOT)
            except OSError as exc:
                self._fail(job.id, f"could not snapshot the dataset: {exc}")
                raise
            self._queue.put(job.id)
        return job

    def cancel(self, tenant: str, job_id: str) -> JobRecord:
        job = self.store.get(job_id, tenant)
        with self._lock:
            if job_id in self._publishing:
                raise FailedPrecondition(f"job {job_id} has finished training and is publishing its adapter")
            if self.store.set_state(job_id, states.CANCELLED, only_from=(states.QUEUED,)):
                # Only its dataset snapshot is there: a queued job has not trained yet.
                shutil.rmtree(self.work_dir(job_id), ignore_errors=True)
                return self.store.get(job_id)
            job = self.store.get(job_id)
            if job.finished:
                raise FailedPrecondition(f"job {job_id} has already ended ({job.state})")
            self.store.request_cancel(job_id)
            self._cancelled.add(job_id)
        return self.store.get(job_id)

    # -- the worker --------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None or self._shutdown.is_set():
                return
            try:
                self._process(job_id)
            except Exception:
                log.exception("job %s failed outside its run", job_id)

    def _should_stop(self, job_id: str):
        def check() -> str | None:
            if job_id in self._cancelled:
                return "cancel"
            return "shutdown" if self._shutdown.is_set() else None

        return check

    # Work folders go before the final state is recorded: a client that sees the final state
    # never finds leftovers, and a crash in between is settled on restart (cancel request, registry).
    def _finish_cancelled(self, job_id: str) -> None:
        shutil.rmtree(self.work_dir(job_id), ignore_errors=True)
        self.store.set_state(job_id, states.CANCELLED, only_from=states.UNFINISHED_STATES)
        self._cancelled.discard(job_id)

    def _fail(self, job_id: str, error: str, problems: list[Problem] = ()) -> None:
        shutil.rmtree(self.work_dir(job_id), ignore_errors=True)
        self.store.set_state(
            job_id,
            states.FAILED,
            only_from=states.UNFINISHED_STATES,
            error=error,
            problems=[asdict(p) for p in problems],
        )

    def _process(self, job_id: str) -> None:
        job = self.store.get(job_id)
        if job.finished:
            return
        # A trainer killed between publishing and recording success must not train and publish again.
        published = [v for v in self.registry.list(job.tenant) if v.metadata.get("job_id") == job_id]
        if published:
            self.store.set_state(
                job_id,
                states.SUCCEEDED,
                only_from=states.UNFINISHED_STATES,
                metrics=published[0].metadata["metrics"],
                adapter_path=published[0].registry_path,
            )
            shutil.rmtree(self.work_dir(job_id), ignore_errors=True)
            return
        if not self.store.set_state(job_id, states.VALIDATING, only_from=(states.QUEUED, states.VALIDATING)):
            if self.store.get(job_id).state != states.RUNNING:
                return
        try:
            self._train(job, JobSpec.from_dict(job.spec))
        except Stopped as stop:
            if stop.reason == "cancel":
                self._finish_cancelled(job_id)
            # On shutdown the job stays as it is and resumes from its checkpoint on the next start.
        except Exception as exc:
            log.exception("job %s failed", job_id)
            self._fail(job_id, f"{type(exc).__name__}: {exc}")

    def _train(self, job: JobRecord, spec: JobSpec) -> None:
        from transformers import AutoTokenizer

        from services.trainer import methods
        from services.trainer.rendering import ChatRenderer

        work = self.work_dir(job.id)
        should_stop = self._should_stop(job.id)
        snapshot = work / SNAPSHOT
        tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        renderer = ChatRenderer(tokenizer)
        validator = DatasetValidator(renderer.token_count, self.min_examples)
        report = validator.validate(snapshot, max_seq_len=spec.hyperparameters.max_seq_len)
        wanted = ("preference",) if spec.method == "dpo" else SUPERVISED_FORMATS
        if report.format is not None and report.format not in wanted:
            report.problems.append(
                Problem(0, "format", f"method {spec.method} needs {' or '.join(wanted)} data, not {report.format}")
            )
        if report.problems:
            self._fail(job.id, f"the dataset has {len(report.problems)} problems", report.problems)
            return
        dataset_sha256, _ = file_digest(snapshot)
        train, held_out = split_examples(
            report.examples, spec.hyperparameters.validation_fraction, spec.hyperparameters.seed
        )
        if not self.store.set_state(job.id, states.RUNNING, only_from=(states.VALIDATING, states.RUNNING)):
            return
        recorder = _EventRecorder(self.store, job.id)
        import torch

        torch.manual_seed(spec.hyperparameters.seed)
        base = methods.load_base_model(self.model_dir, methods.training_device())
        if spec.method == "dpo":
            from services.trainer.preference import run_dpo

            model, result = run_dpo(spec, base, tokenizer, train, held_out, work, recorder, should_stop)
        else:
            from services.trainer.training import TrainingRun

            model = methods.build_trainable_model(spec, base)
            run = TrainingRun(
                model,
                [renderer.supervised(e["messages"]) for e in train],
                [renderer.supervised(e["messages"]) for e in held_out],
                spec.hyperparameters,
                work,
                recorder,
                should_stop,
                tokenizer.pad_token_id,
            )
            result = run.run()
        metrics = {
            "train_loss": result.train_loss,
            "validation_loss": result.validation_loss,
            "steps": result.steps,
            "tokens_per_second": result.tokens_per_second,
            "trainable_fraction": methods.trainable_fraction(model),
            # Process peak RSS on CPU; on a GPU, the peak the device allocated.
            "peak_memory_bytes": (
                torch.cuda.max_memory_allocated()
                if torch.cuda.is_available()
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            ),
        }
        with self._lock:
            if should_stop():
                raise Stopped(should_stop())
            self._publishing.add(job.id)
        try:
            self._publish(job, spec, model, work, report.format, dataset_sha256, metrics)
        finally:
            with self._lock:
                self._publishing.discard(job.id)

    def _publish(self, job, spec, model, work, dataset_format, dataset_sha256, metrics) -> None:
        from services.trainer import methods

        output = work / "output"
        shutil.rmtree(output, ignore_errors=True)
        methods.save_artifact(spec, model, output, BASE_MODEL_NAME)
        hp = spec.hyperparameters
        metadata = {
            "base_model": BASE_MODEL_NAME,
            "method": spec.method,
            "servable": spec.method in ("lora", "dpo"),
            "hyperparameters": asdict(hp),
            "lora": asdict(spec.lora) if spec.lora else None,
            "dataset_sha256": dataset_sha256,
            "dataset_format": dataset_format,
            "metrics": metrics,
            "created_time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "job_id": job.id,
        }
        if spec.lora:
            metadata["rank"] = spec.lora.r
        if spec.method == "selective":
            metadata["layers"] = methods.top_layer_indices(model, hp.selective_top_layers)
            metadata["artifact"] = "selective_layers: materialize a full model with services.trainer.selective"
        if spec.method == "prompt_tuning":
            metadata["num_virtual_tokens"] = hp.num_virtual_tokens
        version = self.registry.publish(job.tenant, spec.adapter_name, output, metadata)
        shutil.rmtree(work, ignore_errors=True)
        self.store.record(job.id, "final_metrics", metrics)
        self.store.set_state(
            job.id, states.SUCCEEDED, only_from=(states.RUNNING,), metrics=metrics, adapter_path=version.registry_path
        )
