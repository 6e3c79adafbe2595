"""The generator's gRPC servicer: validate, call the core, let the interceptor map errors."""

from __future__ import annotations

import asyncio
import logging

import grpc

from ragtune.controlplane import Database
from ragtune.controlplane.aliases import AliasStore
from ragtune.registry import AdapterRegistry
from ragtune.server import ServiceHealth
from ragtune.tenancy import tenant_of
from ragtune.v1 import generator_pb2, generator_pb2_grpc
from services.generator import convert
from services.generator.adapters import AdapterCatalog, CatalogEntry
from services.generator.aliases import AliasResolver
from services.generator import metrics as generator_metrics
from services.generator.engine import ENGINE_DEAD, VllmEngine
from services.generator.core import GenerationStream, Generator
from services.generator.prompts import PromptRenderer
from services.generator.settings import GeneratorSettings

log = logging.getLogger(__name__)

SERVICE_NAME = generator_pb2.DESCRIPTOR.services_by_name["GeneratorService"].full_name


def _adapter_message(entry: CatalogEntry) -> generator_pb2.LoadedAdapter:
    return generator_pb2.LoadedAdapter(
        name=entry.ref,
        registry_path=entry.version.registry_path,
        rank=entry.rank,
        base_model=str(entry.version.metadata.get("base_model", "")),
    )


def _answered_by(stream: GenerationStream) -> str:
    return stream.adapter.ref if stream.adapter is not None else ""


def _close_when_done(stream: GenerationStream, context: grpc.aio.ServicerContext) -> None:
    # A cancelled or timed-out call may leave the response generator suspended: closing the stream
    # from the call's done callback aborts the engine request and frees its slot at once.
    context.add_done_callback(lambda _ctx: asyncio.ensure_future(stream.close()))


class GeneratorServicer(generator_pb2_grpc.GeneratorServiceServicer):
    def __init__(self, service: "GeneratorService"):
        self._service = service

    @property
    def _core(self) -> Generator:
        # Built in start() before health turns SERVING: ServiceHost's readiness gate answers UNAVAILABLE
        # to calls that arrive earlier.
        return self._service.generator

    async def _open(self, request, context) -> GenerationStream:
        stream = await self._core.open(
            tenant_of(context),
            convert.generation_input(request.input),
            convert.sampling_request(request.sampling),
            request.adapter,
        )
        _close_when_done(stream, context)
        return stream

    async def Generate(self, request, context):
        stream = await self._open(request, context)
        with self._service.per_version.measure(stream):
            choices = await stream.collect()
        return convert.generate_response(
            choices, stream.prompt_tokens, stream.completion_tokens, _answered_by(stream)
        )

    async def GenerateStream(self, request, context):
        # The proto's protocol: deltas naming their choice, a message with finish_reason ending each choice,
        # and usage and adapter on the last message (with n = 1: deltas, then one final message).
        stream = await self._open(request, context)
        with self._service.per_version.measure(stream):
            async for chunk in stream.chunks():
                message = convert.stream_message(chunk)
                if chunk.finish_reason is not None and stream.finished:
                    message.usage.CopyFrom(convert.usage(stream.prompt_tokens, stream.completion_tokens))
                    message.adapter = _answered_by(stream)
                yield message

    async def LoadAdapter(self, request, context):
        entry = await self._core.catalog.load(tenant_of(context), request.name, "name")
        return generator_pb2.LoadAdapterResponse(adapter=_adapter_message(entry))

    async def UnloadAdapter(self, request, context):
        await self._core.catalog.unload(tenant_of(context), request.name, "name")
        return generator_pb2.UnloadAdapterResponse()

    async def ListAdapters(self, request, context):
        entries = self._core.catalog.loaded(tenant_of(context))
        return generator_pb2.GeneratorServiceListAdaptersResponse(adapters=[_adapter_message(e) for e in entries])

    async def GetModelInfo(self, request, context):
        settings = self._service.settings
        return generator_pb2.GetModelInfoResponse(
            base_model=settings.base_model_name,
            max_context_tokens=self._core.engine.max_model_len,
            adapters=[_adapter_message(e) for e in self._core.catalog.loaded(tenant_of(context))],
            max_lora_rank=settings.max_lora_rank,
            max_loras=settings.max_loras,
        )


class GeneratorService:
    """Hosts the generator: starts the vLLM engine and loads the tokenizer on start, shuts the engine down on stop.

    `generator` (the core) and `engine` are None until start() returns; tests inspect `engine`
    (e.g. `engine.unfinished_requests()`) through InProcessServer.call.

    Health follows the engine (`health()`, polled by the ServiceHost): an engine that errored or
    stopped (its engine core process died: vLLM cannot restart it in this process) or that holds
    requests without producing output for `engine_stall_timeout_s` makes the service not ready and
    not live, so the gateway stops routing here, new requests get UNAVAILABLE at once, and the
    kubelet restarts the container. The load gauges (metrics.py) are registered on construction."""

    service_names = (SERVICE_NAME,)

    def __init__(self, settings: GeneratorSettings):
        self.settings = settings
        self.engine = None
        self.generator: Generator | None = None
        self.gauges = generator_metrics.register(self)
        self.per_version = generator_metrics.PerVersion()
        self.database: Database | None = None

    async def health(self) -> ServiceHealth:
        engine = self.engine
        if engine is None:
            return ServiceHealth(ready=False, reason="the generator has no engine (starting or stopped)")
        if engine.errored:
            return ServiceHealth(ready=False, live=False, reason=ENGINE_DEAD)
        stalled = engine.seconds_since_progress()
        if stalled > self.settings.engine_stall_timeout_s:
            return ServiceHealth(
                ready=False,
                live=False,
                reason=f"the generation engine holds {engine.unfinished_requests()} requests but produced nothing for"
                f" {stalled:.0f} s (limit {self.settings.engine_stall_timeout_s:g} s): taken as hung",
            )
        return ServiceHealth(ready=True)

    def register(self, server: grpc.aio.Server) -> None:
        generator_pb2_grpc.add_GeneratorServiceServicer_to_server(GeneratorServicer(self), server)

    async def start(self) -> None:
        s = self.settings
        renderer = await asyncio.to_thread(PromptRenderer.load, s.model_dir)
        self.engine = await VllmEngine.create(
            s.model_dir,
            dtype=s.dtype,
            enforce_eager=s.enforce_eager,
            max_model_len=s.max_model_len,
            kv_cache_space_gib=s.kv_cache_space_gib,
            gpu_memory_utilization=s.gpu_memory_utilization,
            max_num_seqs=s.max_num_seqs,
            block_size=s.block_size,
            reserved_cpus=s.reserved_cpus,
            max_loras=s.max_loras,
            max_lora_rank=s.max_lora_rank,
            max_cpu_loras=s.max_cpu_loras,
        )
        catalog = AdapterCatalog(
            AdapterRegistry(s.registry_root), self.engine, base_model=s.base_model_name, max_lora_rank=s.max_lora_rank
        )
        self.database = Database.from_settings(s)
        if s.database_migrate:
            await asyncio.to_thread(self.database.migrate, 30.0)
        self.generator = Generator(
            self.engine,
            renderer,
            catalog,
            AliasResolver(AliasStore(self.database), s.alias_refresh_s),
            max_in_flight=s.max_in_flight,
            default_temperature=s.default_temperature,
            default_max_tokens=s.default_max_tokens,
            max_n=s.max_n,
        )

    async def stop(self) -> None:
        if self.generator is not None:
            self.generator.close()
            self.generator = None
        if self.engine is not None:
            engine, self.engine = self.engine, None
            await engine.shutdown()
        if self.database is not None:
            self.database.dispose()
