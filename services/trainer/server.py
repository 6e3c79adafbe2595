"""The trainer's gRPC servicer (protobuf in, the core called, protobuf out; the interceptor maps the
core's errors) and the `TrainerService` host object that opens and closes the core."""

from __future__ import annotations

import asyncio

import grpc

from ragtune.errors import InvalidArgument
from ragtune.tenancy import actor_of, tenant_of
from ragtune.v1 import trainer_pb2, trainer_pb2_grpc
from services.trainer import convert
from services.trainer.core import TrainerCore
from services.trainer.settings import TrainerSettings

SERVICE_NAME = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, core: TrainerCore):
        self.core = core

    async def CreateJob(self, request, context):
        tenant = tenant_of(context)
        if not request.HasField("spec"):
            raise InvalidArgument("spec", "is required")
        job = await asyncio.to_thread(
            self.core.create_job, tenant, convert.spec_request(request.spec), request.client_request_id
        )
        return trainer_pb2.CreateJobResponse(job=convert.job_message(job))

    async def GetJob(self, request, context):
        job = await asyncio.to_thread(self.core.get_job, tenant_of(context), request.id)
        return trainer_pb2.GetJobResponse(job=convert.job_message(job))

    async def ListJobs(self, request, context):
        jobs = await asyncio.to_thread(self.core.list_jobs, tenant_of(context), convert.state_filter(request.state))
        return trainer_pb2.ListJobsResponse(jobs=[convert.job_message(j) for j in jobs])

    async def CancelJob(self, request, context):
        job = await asyncio.to_thread(self.core.cancel_job, tenant_of(context), request.id)
        return trainer_pb2.CancelJobResponse(job=convert.job_message(job))

    async def WatchJob(self, request, context):
        async for event in self.core.watch_job(tenant_of(context), request.id, request.after_sequence):
            yield trainer_pb2.WatchJobResponse(event=convert.event_message(event))

    async def ValidateDataset(self, request, context):
        report = await asyncio.to_thread(self.core.validate_dataset, tenant_of(context), convert.dataset_check(request))
        return convert.validation_response(report)

    async def UploadDataset(self, request_iterator, context):
        tenant = tenant_of(context)
        upload = None
        try:
            async for request in request_iterator:
                if upload is None:
                    upload = self.core.upload_dataset(tenant, request.name)
                else:
                    upload.check_name(request.name)
                if request.content:
                    await asyncio.to_thread(upload.write, request.content)
            if upload is None:
                raise InvalidArgument("name", "the stream was empty; the first message must name the dataset")
            info = await asyncio.to_thread(upload.commit)
        except BaseException:
            if upload is not None:
                upload.abort()
            raise
        return convert.upload_response(info)

    async def ListAdapters(self, request, context):
        adapters = await asyncio.to_thread(self.core.list_adapters_with_aliases, tenant_of(context))
        return trainer_pb2.ListAdaptersResponse(adapters=[convert.adapter_message(a, aliases) for a, aliases in adapters])

    async def GetAdapter(self, request, context):
        adapter = await asyncio.to_thread(self.core.get_adapter, tenant_of(context), request.name, request.version)
        return trainer_pb2.GetAdapterResponse(adapter=convert.adapter_message(adapter))

    async def DeleteAdapter(self, request, context):
        deleted = await asyncio.to_thread(
            self.core.delete_adapter, tenant_of(context), request.name, request.version
        )
        return trainer_pb2.DeleteAdapterResponse(deleted=deleted)


    async def SetAdapterAlias(self, request, context):
        if len(request.reason) > 1000:
            raise InvalidArgument("reason", "must be at most 1000 characters")
        alias = await asyncio.to_thread(self.core.set_alias, tenant_of(context), request.adapter, request.alias,
                                        convert.alias_targets(request.targets), actor_of(context), request.reason)
        return trainer_pb2.SetAdapterAliasResponse(alias=convert.alias_message(alias))

    async def GetAdapterAlias(self, request, context):
        view = await asyncio.to_thread(self.core.get_alias, tenant_of(context), request.adapter, request.alias)
        return trainer_pb2.GetAdapterAliasResponse(alias=convert.alias_message(view.alias),
                                                   history=[convert.alias_event_message(e) for e in view.history])

    async def RollbackAdapterAlias(self, request, context):
        if len(request.reason) > 1000:
            raise InvalidArgument("reason", "must be at most 1000 characters")
        alias = await asyncio.to_thread(self.core.rollback_alias, tenant_of(context), request.adapter,
                                        request.alias, actor_of(context), request.reason)
        return trainer_pb2.RollbackAdapterAliasResponse(alias=convert.alias_message(alias))


class TrainerService:
    """Hosts the trainer: on start, opens the core (tokenizer, control-plane database, migration)
    and starts its workers, which claim queued jobs and resume abandoned ones; stops them on stop."""

    service_names = (SERVICE_NAME,)

    def __init__(self, settings: TrainerSettings):
        self.settings = settings
        self.core = TrainerCore(settings, gate_spec=convert.gate_evaluation_spec)

    def register(self, server: grpc.aio.Server) -> None:
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(self.core), server)

    async def start(self) -> None:
        await asyncio.to_thread(self.core.open)
        self.core.start_workers(asyncio.get_running_loop())

    async def stop(self) -> None:
        await asyncio.to_thread(self.core.close)
