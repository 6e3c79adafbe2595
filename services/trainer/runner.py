"""`JobRunner`: runs one claimed job to its end: validate the dataset snapshot, train (resuming from
the checkpoint in the job's work folder), publish exactly one adapter version, record the final
state under the worker's lease; or stop at the next step on cancel, shutdown or a lost lease."""

from __future__ import annotations

import logging
import random
import resource
import shutil
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from ragtune.controlplane import jobs as states
from ragtune.controlplane.adapter_versions import AdapterVersionCounter
from ragtune.controlplane.database import DatabaseUnavailable
from ragtune.controlplane.jobs import JobRecord, JobStore
from ragtune.models import BASE_MODEL_NAME
from ragtune.registry import AdapterRegistry, AdapterVersion
from services.trainer.datasets import file_digest
from services.trainer.jobspec import JobSpec
from services.trainer.training import Stopped
from services.trainer.validation import DatasetValidator, Problem
from services.trainer.workers import CANCEL, LOST, Lease

log = logging.getLogger(__name__)

SUPERVISED_FORMATS = ("chat", "prompt_completion", "instruction")
SNAPSHOT = "dataset.jsonl"


class _EventRecorder:
    """The training listener: every event goes to the job's events, unless the lease is lost (the
    job's new worker reports its progress from then on)."""

    def __init__(self, store: JobStore, job_id: str, lease: Lease):
        self.store, self.job_id, self.lease = store, job_id, lease

    def _record(self, kind: str, payload: dict, **counters) -> None:
        if self.lease.stop_reason() != LOST:
            self.store.record(self.job_id, kind, payload, **counters)

    def progress(self, step, total_steps, epoch, loss, lr, tokens_per_second):
        payload = {"step": step, "total_steps": total_steps, "epoch": epoch, "train_loss": loss,
                   "learning_rate": lr, "tokens_per_second": tokens_per_second}
        self._record("progress", payload, step=step, total_steps=total_steps)

    def epoch_end(self, epoch, train_loss, validation_loss):
        self._record("epoch_end", {"epoch": epoch, "train_loss": train_loss, "validation_loss": validation_loss})

    def checkpoint_saved(self, step):
        self._record("checkpoint_saved", {"step": step})

    def note(self, message):
        self._record("message", {"text": message})


def split_examples(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    order = list(examples)
    random.Random(seed).shuffle(order)
    held_out = max(1, int(len(order) * fraction)) if fraction > 0 and len(order) >= 2 else 0
    return order[held_out:], order[:held_out]


class JobRunner:
    def __init__(self, store: JobStore, registry: AdapterRegistry, *, work_root: Path, model_dir: Path,
                 min_examples: int, open_gate=None):
        self.store, self.registry = store, registry
        # Version numbers come from the control plane, so no two replicas (or a delete and a new
        # publish) ever give one number to two different adapters.
        self.version_counter = AdapterVersionCounter(store.db)
        self.work_root, self.model_dir, self.min_examples = work_root, model_dir, min_examples
        # (job, spec, new version) -> the id of the promotion gate's evaluation, queued for a gateway
        self.open_gate = open_gate

    def work_dir(self, job_id: str) -> Path:
        return self.work_root / job_id

    # Work folders go before the final state is recorded: a client that sees the final state never
    # finds leftovers, and a crash in between is settled by the next worker (cancel mark, registry).
    def _finish(self, job: JobRecord, lease: Lease, state: str, **fields) -> None:
        if not lease.renew():
            return  # another worker owns the job now; its files are its own
        shutil.rmtree(self.work_dir(job.id), ignore_errors=True)
        self.store.set_state(job.id, state, only_from=states.UNFINISHED_STATES, worker=lease.worker, **fields)

    def _fail(self, job: JobRecord, lease: Lease, error: str, problems: list[Problem] = ()) -> None:
        self._finish(job, lease, states.FAILED, error=error, problems=[asdict(p) for p in problems])

    def _published(self, job: JobRecord, spec: JobSpec) -> AdapterVersion | None:
        """The version this job already published (a worker died between publishing and recording)."""
        for version in reversed(self.registry.versions(job.tenant, spec.adapter_name)):
            adapter = self.registry.get(job.tenant, f"{spec.adapter_name}/{version}")
            if adapter.metadata.get("job_id") == job.id:
                return adapter
        return None

    def _settle_published(self, job: JobRecord, spec: JobSpec, lease: Lease) -> bool:
        adapter = self._published(job, spec)
        if adapter is None:
            return False
        log.info("job %s already published %s; recording it", job.id, adapter.registry_path)
        self._published_done(job, spec, lease, adapter, adapter.metadata.get("metrics"))
        return True

    def _published_done(self, job: JobRecord, spec: JobSpec, lease: Lease, adapter: AdapterVersion, metrics) -> None:
        """SUCCEEDED, or EVALUATING while its promotion gate decides (the gateway then ends it)."""
        if spec.gate is None or self.open_gate is None:
            self._finish(job, lease, states.SUCCEEDED, metrics=metrics, adapter_path=adapter.registry_path)
            return
        evaluation_id = self.open_gate(job, spec, adapter.version)
        self.store.record(job.id, "message", {
            "text": f"published {adapter.registry_path}; its promotion gate for alias '{spec.gate.alias}' is"
                    f" evaluating it (evaluation {evaluation_id})"})
        # No trainer claims an EVALUATING job: the lease ends here.
        self._finish(job, lease, states.EVALUATING, metrics=metrics, adapter_path=adapter.registry_path,
                     worker_id=None, lease_expires=0.0)

    def run(self, job: JobRecord, lease: Lease) -> None:
        """Runs a job this worker has just claimed. Raises DatabaseUnavailable (the job stays as it is)."""
        try:
            self._run(job, JobSpec.from_dict(job.spec), lease)
        except DatabaseUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - any other fault fails this job, not the worker
            log.exception("job %s failed", job.id)
            self._fail(job, lease, f"{type(exc).__name__}: {exc}")

    def _run(self, job: JobRecord, spec: JobSpec, lease: Lease) -> None:
        if self._settle_published(job, spec, lease):
            return
        if job.cancel_requested:  # its last worker died before it could stop
            self._finish(job, lease, states.CANCELLED)
            return
        if job.state != states.RUNNING and not self.store.set_state(
            job.id, states.VALIDATING, only_from=(states.QUEUED, states.VALIDATING), worker=lease.worker
        ):
            return  # cancelled while queued, or no longer ours
        try:
            self._train(job, spec, lease)
        except Stopped as stop:
            if stop.reason == CANCEL:
                self._finish(job, lease, states.CANCELLED)
            # SHUTDOWN: the pool releases the job; LOST: another worker has it. Either way it
            # resumes from its last checkpoint, which stays in the work folder.
            log.info("job %s stopped (%s)", job.id, stop.reason)

    def _validate(self, job: JobRecord, spec: JobSpec, tokenizer):
        from services.trainer.rendering import ChatRenderer

        validator = DatasetValidator(ChatRenderer(tokenizer).token_count, self.min_examples)
        report = validator.validate(self.work_dir(job.id) / SNAPSHOT, max_seq_len=spec.hyperparameters.max_seq_len)
        wanted = ("preference",) if spec.method == "dpo" else SUPERVISED_FORMATS
        if report.format is not None and report.format not in wanted:
            report.problems.append(
                Problem(0, "format", f"method {spec.method} needs {' or '.join(wanted)} data, not {report.format}")
            )
        return report

    def _train(self, job: JobRecord, spec: JobSpec, lease: Lease) -> None:
        import torch
        from transformers import AutoTokenizer

        from services.trainer import methods
        from services.trainer.rendering import ChatRenderer

        work = self.work_dir(job.id)
        tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        report = self._validate(job, spec, tokenizer)
        if report.problems:
            self._fail(job, lease, f"the dataset has {len(report.problems)} problems", report.problems)
            return
        dataset_sha256, _ = file_digest(work / SNAPSHOT)
        hp = spec.hyperparameters
        train, held_out = split_examples(report.examples, hp.validation_fraction, hp.seed)
        if not self.store.set_state(job.id, states.RUNNING, only_from=(states.VALIDATING, states.RUNNING),
                                    worker=lease.worker):
            return
        recorder = _EventRecorder(self.store, job.id, lease)
        torch.manual_seed(hp.seed)
        base = methods.load_base_model(self.model_dir, methods.training_device())
        if spec.method == "dpo":
            from services.trainer.preference import run_dpo

            model, result = run_dpo(spec, base, tokenizer, train, held_out, work, recorder, lease.stop_reason)
        else:
            from services.trainer.training import TrainingRun

            renderer = ChatRenderer(tokenizer)
            model = methods.build_trainable_model(spec, base)
            run = TrainingRun(
                model,
                [renderer.supervised(e["messages"]) for e in train],
                [renderer.supervised(e["messages"]) for e in held_out],
                hp,
                work,
                recorder,
                lease.stop_reason,
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
        # Exactly one version per job: publish only while still holding the lease (renewed just
        # now, so it cannot run out during the copy), and not if another worker already has.
        reason = LOST if not lease.renew() else lease.stop_reason()
        if reason:
            raise Stopped(reason)
        if self._settle_published(job, spec, lease):
            return
        self._publish(job, spec, model, lease, report.format, dataset_sha256, metrics)

    def _publish(self, job, spec, model, lease, dataset_format, dataset_sha256, metrics) -> None:
        from services.trainer import methods

        work = self.work_dir(job.id)
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
        version = self.registry.publish(job.tenant, spec.adapter_name, output, metadata, counter=self.version_counter)
        self.store.record(job.id, "final_metrics", metrics)
        self._published_done(job, spec, lease, version, metrics)
