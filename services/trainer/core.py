"""`TrainerCore`: what the trainer does, in plain Python (dataclasses in and out, domain errors raised,
no gRPC): datasets, jobs on the shared control plane, watching them, and the adapter registry."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import threading
from collections.abc import AsyncIterator
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ragtune.controlplane import Database
from ragtune.controlplane import jobs as states
from ragtune.controlplane.aliases import AliasStore
from ragtune.controlplane.datasets import DatasetRecords
from ragtune.controlplane.evaluations import EvaluationStore, gate_evaluation_id, report_path
from ragtune.controlplane.jobs import EventRecord, JobRecord, JobStore, new_job_id
from ragtune.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from ragtune.models import base_model_dir
from ragtune.registry import AdapterRegistry, AdapterVersion, validate_name
from services.trainer.aliases import AdapterAliases, AliasView, targets_of
from services.trainer.datasets import DatasetStore, DatasetUpload
from services.trainer.jobspec import JobSpec, SpecRequest, resolve_spec, validated
from services.trainer.runner import SNAPSHOT, JobRunner
from services.trainer.settings import TrainerSettings
from services.trainer.validation import DatasetValidator, ValidationReport
from services.trainer.workers import WorkerPool

ALL_STATES = (*states.UNFINISHED_STATES, *states.FINAL_STATES)
MIGRATE_WAIT_S = 30.0


@dataclass(frozen=True)
class DatasetCheck:
    """A ValidateDataset request: format None means detect it, max_seq_len None means 256."""

    dataset: str
    format: str | None = None
    max_seq_len: int | None = None


class _DatasetCheckModel(BaseModel):
    model_config = ConfigDict(frozen=True)

    format: Literal["chat", "prompt_completion", "instruction", "preference"] | None = None
    max_seq_len: int = Field(256, ge=16, le=2048)


class _Watchers:
    """Wakes the watch streams on the event loop when this process records an event; events from
    other replicas are found by polling."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self.changed = asyncio.Event()

    def notify(self, _job_id: str) -> None:
        try:
            self._loop.call_soon_threadsafe(self._wake)
        except RuntimeError:
            pass  # the loop has closed: nobody is watching any more

    def _wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


def _job_id(job_id: str) -> str:
    if not job_id:
        raise InvalidArgument("id", "is required")
    if len(job_id) > 64:
        raise InvalidArgument("id", "is not a job id")
    return job_id


# (job id, adapter, candidate version, incumbent version or 0, gate as a dict) -> evaluation spec bytes
GateSpecBuilder = Callable[[str, str, int, int, dict], bytes]


class TrainerCore:
    """Built cheaply; `open()` (blocking: tokenizer, database, migration) must run before any other
    method, and `start_workers()` starts claiming jobs."""

    def __init__(self, settings: TrainerSettings, gate_spec: GateSpecBuilder | None = None):
        self.settings = settings
        self.gate_spec = gate_spec
        self.aliases: AdapterAliases | None = None
        self.evaluations: EvaluationStore | None = None
        self.registry = AdapterRegistry(settings.registry_root)
        self.worker_id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.num_layers = 0
        self.database: Database | None = None
        self.store: JobStore | None = None
        self.datasets: DatasetStore | None = None
        self.runner: JobRunner | None = None
        self.pool: WorkerPool | None = None
        self._watchers: _Watchers | None = None
        self._validator: DatasetValidator | None = None
        self._validator_lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------------

    def open(self) -> None:
        import torch
        from transformers import AutoConfig, AutoTokenizer

        from services.trainer.rendering import ChatRenderer

        settings = self.settings
        torch.set_num_threads(settings.torch_threads)
        model_dir = base_model_dir(settings.model_cache)
        self.num_layers = AutoConfig.from_pretrained(model_dir).num_hidden_layers
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self._validator = DatasetValidator(ChatRenderer(tokenizer).token_count, settings.min_examples)
        self.database = Database.from_settings(settings)
        if settings.database_migrate:
            self.database.migrate(wait_s=MIGRATE_WAIT_S)
        self.store = JobStore(self.database)
        records = DatasetRecords(self.database)
        root = settings.trainer_dir
        self.datasets = DatasetStore(root / "datasets", settings.artifacts, settings.max_dataset_bytes, records)
        self.aliases = AdapterAliases(self.registry, AliasStore(self.database))
        self.evaluations = EvaluationStore(self.database)
        self.runner = JobRunner(self.store, self.registry, work_root=root / "work", model_dir=model_dir,
                                min_examples=settings.min_examples, open_gate=self.open_gate)
        self.pool = WorkerPool(self.store, self.runner.run, worker_id=self.worker_id,
                               workers=settings.concurrent_jobs, lease_s=settings.lease_s,
                               poll_interval_s=settings.poll_interval_s)

    def start_workers(self, loop: asyncio.AbstractEventLoop) -> None:
        self._watchers = _Watchers(loop)
        self.store.subscribe(self._watchers.notify)
        self.pool.start()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.stop()
        if self.database is not None:
            self.database.dispose()

    def work_dir(self, job_id: str) -> Path:
        return self.runner.work_dir(job_id)

    # -- datasets --------------------------------------------------------------------------------

    def upload_dataset(self, tenant: str, name: str) -> DatasetUpload:
        return self.datasets.upload(tenant, name)

    def validate_dataset(self, tenant: str, check: DatasetCheck) -> ValidationReport:
        request = validated(_DatasetCheckModel, {k: v for k, v in (("format", check.format),
                                                                     ("max_seq_len", check.max_seq_len)) if v})
        path = self.datasets.get(tenant, check.dataset)
        # One tokenizer serves the RPCs; the Rust tokenizer must not be used by two threads at once.
        with self._validator_lock:
            return self._validator.validate(path, fmt=request.format, max_seq_len=request.max_seq_len)

    # -- jobs ------------------------------------------------------------------------------------

    def create_job(self, tenant: str, request: SpecRequest, client_request_id: str = "") -> JobRecord:
        spec = resolve_spec(request, num_layers=self.num_layers,
                            default_checkpoint_every=self.settings.default_checkpoint_every_steps)
        if len(client_request_id) > 128:
            raise InvalidArgument("client_request_id", "must be at most 128 characters")
        source = self.datasets.get(tenant, spec.dataset, "spec.dataset")
        if client_request_id:
            try:
                return self.store.find_by_request(tenant, client_request_id)  # a retry
            except NotFound:
                pass
        if self.store.count_waiting() >= self.settings.max_queued_jobs:
            raise ResourceExhausted(f"{self.settings.max_queued_jobs} jobs are already waiting; retry later")
        # The job trains on the dataset as it is now, even if it is uploaded again before the job
        # runs; the snapshot is in place before the job exists, so no worker can claim it sooner.
        job_id = new_job_id()
        work = self.work_dir(job_id)
        try:
            work.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, work / SNAPSHOT)
            except OSError:
                shutil.copyfile(source, work / SNAPSHOT)
            job, created = self.store.create(tenant, spec.to_dict(), client_request_id, job_id=job_id)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        if created:
            self.pool.wake()
        else:
            shutil.rmtree(work, ignore_errors=True)  # another replica made this request's job first
        return job

    def get_job(self, tenant: str, job_id: str) -> JobRecord:
        return self.store.get(_job_id(job_id), tenant)

    def list_jobs(self, tenant: str, state: str | None = None) -> list[JobRecord]:
        if state is not None and state not in ALL_STATES:
            raise InvalidArgument("state", f"unknown job state {state}")
        return self.store.list(tenant, state)

    def cancel_job(self, tenant: str, job_id: str) -> JobRecord:
        """A queued job ends CANCELLED at once; a running one (on any replica) stops at its next step
        after its worker sees the request: at once on this replica, within lease_s / 3 on another."""
        job = self.store.get(_job_id(job_id), tenant)
        if job.finished:
            raise FailedPrecondition(f"job {job_id} has already ended ({job.state})")
        if job.state == states.EVALUATING:
            # Its adapter is published; what is left is the gate's evaluation, which decides the alias.
            raise FailedPrecondition(f"job {job_id} has trained; cancel its promotion gate's evaluation"
                                     f" gate-{job_id} instead (the alias then stays)")
        if self.store.set_state(job_id, states.CANCELLED, only_from=(states.QUEUED,)):
            # Only its dataset snapshot is there: a queued job has not trained yet.
            shutil.rmtree(self.work_dir(job_id), ignore_errors=True)
            return self.store.get(job_id)
        self.store.request_cancel(job_id)
        self.pool.cancel_local(job_id)
        return self.store.get(job_id)

    async def watch_job(self, tenant: str, job_id: str, after: int = 0) -> AsyncIterator[EventRecord]:
        """The job's events after `after`, as they come, ending with its final state's event. Events
        recorded on this replica arrive at once, those from others within poll_interval_s."""
        job_id = _job_id(job_id)
        if after < 0:
            raise InvalidArgument("after_sequence", "must not be negative")
        await asyncio.to_thread(self.store.get, job_id, tenant)
        while True:
            # Take the wake-up event before reading, so an event recorded in between is not missed.
            changed = self._watchers.changed
            events = await asyncio.to_thread(self.store.events, job_id, after)
            for event in events:
                yield event
                after = event.sequence
                if event.kind == "state_changed" and event.payload["state"] in states.FINAL_STATES:
                    return
            if not events:
                job = await asyncio.to_thread(self.store.get, job_id)
                if job.finished and not await asyncio.to_thread(self.store.events, job_id, after):
                    return  # watched from after its final event
                try:
                    await asyncio.wait_for(changed.wait(), self.settings.poll_interval_s)
                except TimeoutError:
                    pass

    # -- adapters --------------------------------------------------------------------------------

    def list_adapters(self, tenant: str) -> list[AdapterVersion]:
        return self.registry.list(tenant)

    def get_adapter(self, tenant: str, name: str, version: int = 0) -> AdapterVersion:
        return self.registry.get(tenant, _adapter_ref(name, version), "name")

    def delete_adapter(self, tenant: str, name: str, version: int = 0) -> int:
        _adapter_ref(name, version)
        return self.registry.delete(tenant, name, version or None)

    # -- aliases and promotion gates ---------------------------------------------------------------

    def list_adapters_with_aliases(self, tenant: str) -> list[tuple[AdapterVersion, list[str]]]:
        by_version = self.aliases.by_version(tenant)
        return [(a, by_version.get((a.name, a.version), [])) for a in self.registry.list(tenant)]

    def set_alias(self, tenant: str, adapter: str, alias: str, targets: list[tuple[int, int]], actor: str,
                  reason: str = ""):
        return self.aliases.set(tenant, adapter, alias, targets_of(targets), actor, reason)

    def get_alias(self, tenant: str, adapter: str, alias: str) -> AliasView:
        return self.aliases.get(tenant, adapter, alias)

    def rollback_alias(self, tenant: str, adapter: str, alias: str, actor: str, reason: str = ""):
        return self.aliases.rollback(tenant, adapter, alias, actor, reason)

    def open_gate(self, job: JobRecord, spec: JobSpec, version: int) -> str:
        """Queues the gate's evaluation (once per job, whoever asks) and returns its id: a gateway's
        evaluation worker runs it, then moves the alias or not and ends the job with the verdict."""
        gate = spec.gate
        incumbent = self.aliases.incumbent(job.tenant, spec.adapter_name, gate.alias)
        questions = sum(1 for line in gate.eval_set.splitlines() if line.strip())
        record = self.evaluations.create(
            job.tenant, self.gate_spec(job.id, spec.adapter_name, version, incumbent, asdict(gate)),
            {"questions": questions, "answers_total": 2 * questions}, report_path,
            evaluation_id=gate_evaluation_id(job.id))
        return record.id



def _adapter_ref(name: str, version: int) -> str:
    validate_name(name, "name")
    if version < 0:
        raise InvalidArgument("version", "must not be negative (0 means the newest)")
    return f"{name}/{version}" if version else name

