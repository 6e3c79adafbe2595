"""The trainer's gRPC servicer: validate, call the core, let the interceptor map errors."""

from __future__ import annotations

import asyncio
import threading

import grpc

from ragtune.errors import InvalidArgument
from ragtune.models import base_model_dir
from ragtune.registry import AdapterRegistry, validate_name
from ragtune.tenancy import tenant_of
from ragtune.v1 import trainer_pb2, trainer_pb2_grpc
from services.trainer import convert
from services.trainer.datasets import DatasetStore, DatasetValidator, validate_dataset_name
from services.trainer.jobs import FINAL_STATES, JobStore
from services.trainer.jobspec import resolve_spec
from services.trainer.runner import JobRunner
from services.trainer.settings import TrainerSettings

SERVICE_NAME = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name
_WATCH_POLL_S = 1.0


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, service: TrainerService):
        self.s = service

    async def CreateJob(self, request, context):
        tenant = tenant_of(context)
        if not request.HasField("spec"):
            raise InvalidArgument("spec", "is required")
        spec = resolve_spec(
            **convert.spec_arguments(request.spec),
            num_layers=self.s.num_layers,
            default_checkpoint_every=self.s.settings.default_checkpoint_every_steps,
        )
        if len(request.client_request_id) > 128:
            raise InvalidArgument("client_request_id", "must be at most 128 characters")
        job = await asyncio.to_thread(self.s.runner.create, tenant, spec, request.client_request_id)
        return trainer_pb2.CreateJobResponse(job=convert.job_message(job))

    async def GetJob(self, request, context):
        tenant = tenant_of(context)
        job = await asyncio.to_thread(self.s.store.get, _job_id(request.id), tenant)
        return trainer_pb2.GetJobResponse(job=convert.job_message(job))

    async def ListJobs(self, request, context):
        tenant = tenant_of(context)
        if request.state not in trainer_pb2.JobState.values():
            raise InvalidArgument("state", f"unknown job state {request.state}")
        state = convert.state_name(request.state) if request.state else None
        jobs = await asyncio.to_thread(self.s.store.list, tenant, state)
        return trainer_pb2.ListJobsResponse(jobs=[convert.job_message(j) for j in jobs])

    async def CancelJob(self, request, context):
        tenant = tenant_of(context)
        job = await asyncio.to_thread(self.s.runner.cancel, tenant, _job_id(request.id))
        return trainer_pb2.CancelJobResponse(job=convert.job_message(job))

    async def WatchJob(self, request, context):
        tenant = tenant_of(context)
        job_id = _job_id(request.id)
        if request.after_sequence < 0:
            raise InvalidArgument("after_sequence", "must not be negative")
        await asyncio.to_thread(self.s.store.get, job_id, tenant)
        after = request.after_sequence
        while True:
            # Take the wake-up event before reading, so an event recorded in between is not missed.
            changed = self.s.changed
            events = await asyncio.to_thread(self.s.store.events, job_id, after)
            for event in events:
                yield trainer_pb2.WatchJobResponse(event=convert.event_message(event))
                after = event.sequence
                if event.kind == "state_changed" and event.payload["state"] in FINAL_STATES:
                    return
            if not events:
                job = await asyncio.to_thread(self.s.store.get, job_id)
                if job.finished and not await asyncio.to_thread(self.s.store.events, job_id, after):
                    return  # watched from after its final event
                try:
                    await asyncio.wait_for(changed.wait(), _WATCH_POLL_S)
                except TimeoutError:
                    pass

    async def ValidateDataset(self, request, context):
        tenant = tenant_of(context)
        validate_dataset_name(request.dataset, "dataset")
        if request.format not in convert.FORMAT_NAMES and request.format != trainer_pb2.DATASET_FORMAT_UNSPECIFIED:
            raise InvalidArgument("format", f"unknown dataset format {request.format}")
        max_seq_len = request.max_seq_len or 256
        if not 16 <= max_seq_len <= 2048:
            raise InvalidArgument("max_seq_len", f"{max_seq_len} is outside [16, 2048]")
        path = self.s.datasets.get(tenant, request.dataset)
        report = await asyncio.to_thread(self.s.validate, path, convert.FORMAT_NAMES.get(request.format), max_seq_len)
        return trainer_pb2.ValidateDatasetResponse(
            valid=report.valid,
            format=convert.FORMAT_ENUMS.get(report.format, 0),
            examples=len(report.examples),
            problems=[
                trainer_pb2.DatasetProblem(line=p.line, field=p.field, message=p.message) for p in report.problems
            ],
        )

    async def UploadDataset(self, request_iterator, context):
        tenant = tenant_of(context)
        upload = None
        try:
            async for request in request_iterator:
                if upload is None:
                    upload = self.s.datasets.upload(tenant, request.name)
                elif request.name and request.name != upload.name:
                    raise InvalidArgument("name", "must be the same in every message of the stream, or empty")
                if request.content:
                    await asyncio.to_thread(upload.write, request.content)
            if upload is None:
                raise InvalidArgument("name", "the stream was empty; the first message must name the dataset")
            info = await asyncio.to_thread(upload.commit)
        except BaseException:
            if upload is not None:
                upload.abort()
            raise
        return trainer_pb2.UploadDatasetResponse(
            name=info.name, size_bytes=info.size_bytes, sha256=info.sha256, lines=info.lines
        )

    async def ListAdapters(self, request, context):
        tenant = tenant_of(context)
        adapters = await asyncio.to_thread(self.s.registry.list, tenant)
        return trainer_pb2.ListAdaptersResponse(adapters=[convert.adapter_message(a) for a in adapters])

    async def GetAdapter(self, request, context):
        tenant = tenant_of(context)
        ref = _adapter_ref(request.name, request.version)
        adapter = await asyncio.to_thread(self.s.registry.get, tenant, ref, "name")
        return trainer_pb2.GetAdapterResponse(adapter=convert.adapter_message(adapter))

    async def DeleteAdapter(self, request, context):
        tenant = tenant_of(context)
        _adapter_ref(request.name, request.version)
        deleted = await asyncio.to_thread(self.s.registry.delete, tenant, request.name, request.version or None)
        return trainer_pb2.DeleteAdapterResponse(deleted=deleted)


def _job_id(job_id: str) -> str:
    if not job_id:
        raise InvalidArgument("id", "is required")
    if len(job_id) > 64:
        raise InvalidArgument("id", "is not a job id")
    return job_id


def _adapter_ref(name: str, version: int) -> str:
    validate_name(name, "name")
    if version < 0:
        raise InvalidArgument("version", "must not be negative (0 means the newest)")
    return f"{name}/{version}" if version else name


class TrainerService:
    """Hosts the trainer: opens the job database, the dataset store and the registry, loads the
    tokenizer, and starts the job runner (which resumes unfinished jobs); stops it on stop."""

    service_names = (SERVICE_NAME,)

    def __init__(self, settings: TrainerSettings):
        self.settings = settings
        root = settings.trainer_dir
        self.datasets = DatasetStore(root / "datasets", settings.max_dataset_bytes)
        self.registry = AdapterRegistry(settings.registry_root)
        self.store: JobStore | None = None
        self.runner: JobRunner | None = None
        self.changed = asyncio.Event()
        self.num_layers = 0
        self._validator: DatasetValidator | None = None
        self._validator_lock = threading.Lock()

    def register(self, server: grpc.aio.Server) -> None:
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(self), server)

    def validate(self, path, fmt, max_seq_len):
        # One tokenizer serves the RPCs; the Rust tokenizer must not be used by two threads at once.
        with self._validator_lock:
            return self._validator.validate(path, fmt=fmt, max_seq_len=max_seq_len)

    def _wake_watchers(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.changed = asyncio.Event()
        await asyncio.to_thread(self._open)

        def on_event(job_id: str) -> None:
            try:
                loop.call_soon_threadsafe(self._wake_watchers)
            except RuntimeError:
                pass  # the loop has closed: nobody is watching any more

        self.store.subscribe(on_event)
        self.runner.start()

    def _open(self) -> None:
        import torch
        from transformers import AutoConfig, AutoTokenizer

        from services.trainer.rendering import ChatRenderer

        torch.set_num_threads(self.settings.torch_threads)
        model_dir = base_model_dir(self.settings.model_cache)
        self.num_layers = AutoConfig.from_pretrained(model_dir).num_hidden_layers
        renderer = ChatRenderer(AutoTokenizer.from_pretrained(model_dir))
        self._validator = DatasetValidator(renderer.token_count, self.settings.min_examples)
        root = self.settings.trainer_dir
        self.store = JobStore(root / "jobs.sqlite3")
        self.runner = JobRunner(
            self.store,
            self.datasets,
            self.registry,
            work_root=root / "work",
            model_dir=model_dir,
            min_examples=self.settings.min_examples,
            max_queued=self.settings.max_queued_jobs,
            workers=self.settings.concurrent_jobs,
        )

    async def stop(self) -> None:
        if self.runner is not None:
            await asyncio.to_thread(self.runner.stop)
        if self.store is not None:
            self.store.close()
