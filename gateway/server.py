"""The gateway's gRPC servicer: authenticate, authorize the scope, then answer (Ask) or forward.

The collection, job and adapter RPCs are thin forwards that differ only in their target and
scope, so they are built from one table (`_FORWARDS`) rather than written out twenty times.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from ragtune.errors import Unavailable
from ragtune.models import base_model_dir
from ragtune.v1 import gateway_pb2, gateway_pb2_grpc
from gateway.auth import ApiKeyStore, Scope
from gateway.downstream import CallBudget, Downstream
from gateway.evaluation.runner import EvaluationRunner
from gateway.rag import AskPipeline, TokenCounter
from gateway.settings import GatewaySettings

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name
log = logging.getLogger(__name__)

# gateway method -> (downstream service, downstream method, scope, idempotent read)
_FORWARDS: dict[str, tuple[str, str, Scope, bool]] = {
    "CreateCollection": ("retriever", "CreateCollection", Scope.INGEST, False),
    "GetCollection": ("retriever", "GetCollection", Scope.READ, True),
    "ListCollections": ("retriever", "ListCollections", Scope.READ, True),
    "DeleteCollection": ("retriever", "DeleteCollection", Scope.INGEST, False),
    "UpsertDocuments": ("retriever", "UpsertDocuments", Scope.INGEST, False),
    "DeleteDocuments": ("retriever", "DeleteDocuments", Scope.INGEST, False),
    "Search": ("retriever", "Search", Scope.READ, True),
    "GetCollectionStats": ("retriever", "GetCollectionStats", Scope.READ, True),
    "CreateJob": ("trainer", "CreateJob", Scope.TRAIN, False),
    "GetJob": ("trainer", "GetJob", Scope.READ, True),
    "ListJobs": ("trainer", "ListJobs", Scope.READ, True),
    "CancelJob": ("trainer", "CancelJob", Scope.TRAIN, False),
    "ValidateDataset": ("trainer", "ValidateDataset", Scope.TRAIN, True),
    "ListAdapters": ("trainer", "ListAdapters", Scope.READ, True),
    "GetAdapter": ("trainer", "GetAdapter", Scope.READ, True),
    "DeleteAdapter": ("trainer", "DeleteAdapter", Scope.TRAIN, False),
    "LoadAdapter": ("generator", "LoadAdapter", Scope.TRAIN, False),
    "UnloadAdapter": ("generator", "UnloadAdapter", Scope.TRAIN, False),
    "ListLoadedAdapters": ("generator", "ListAdapters", Scope.READ, True),
}
# Streaming forwards: gateway method -> (service, downstream method, scope)
_CLIENT_STREAM_FORWARDS = {
    "Ingest": ("retriever", "Ingest", Scope.INGEST),
    "UploadDataset": ("trainer", "UploadDataset", Scope.TRAIN),
}
_SERVER_STREAM_FORWARDS = {"WatchJob": ("trainer", "WatchJob", Scope.READ)}


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    """Registered before the server starts; its keys, channels and pipeline are attached by
    GatewayService.start() before health reports SERVING."""

    def __init__(self, settings: GatewaySettings):
        self._settings = settings
        self._keys = ApiKeyStore([])
        self._down: Downstream | None = None
        self._pipeline: AskPipeline | None = None

    def attach(self, keys: ApiKeyStore, downstream: Downstream, pipeline: AskPipeline,
               evaluations: EvaluationRunner) -> None:
        self._keys, self._down, self._pipeline, self._evaluations = keys, downstream, pipeline, evaluations

    def _authorize(self, context: grpc.aio.ServicerContext, *scopes: Scope) -> CallBudget:
        if self._pipeline is None:
            raise Unavailable("the gateway is still starting")
        principal = self._keys.authenticate(context.invocation_metadata())
        for scope in scopes:
            principal.require(scope)
        return CallBudget.from_context(context, principal.tenant, self._settings.default_timeout_s)

    async def Ask(self, request, context):
        budget = self._authorize(context, Scope.READ)
        return await self._pipeline.ask(request.question, budget)

    async def AskStream(self, request, context):
        budget = self._authorize(context, Scope.READ)
        async for event in self._pipeline.stream(request.question, budget):
            yield event

    async def CreateEvaluation(self, request, context):
        # Measuring knowledge-update cost trains an adapter, so it needs the train scope too.
        scopes = (Scope.READ, Scope.TRAIN) if request.spec.HasField("knowledge_update") else (Scope.READ,)
        budget = self._authorize(context, *scopes)
        evaluation = await self._evaluations.create(budget.tenant, request.spec, budget)
        return gateway_pb2.CreateEvaluationResponse(evaluation=evaluation)

    async def GetEvaluation(self, request, context):
        budget = self._authorize(context, Scope.READ)
        job = self._evaluations.get(budget.tenant, request.id)
        reply = gateway_pb2.GetEvaluationResponse(evaluation=job.snapshot)
        if request.include_report:
            for name, attr in (("report.md", "report_markdown"), ("report.html", "report_html")):
                path = job.folder / name
                if path.exists():
                    setattr(reply, attr, path.read_text(encoding="utf-8"))
        return reply

    async def ListEvaluations(self, request, context):
        budget = self._authorize(context, Scope.READ)
        return gateway_pb2.ListEvaluationsResponse(evaluations=self._evaluations.list(budget.tenant))

    async def WatchEvaluation(self, request, context):
        budget = self._authorize(context, Scope.READ)
        async for snapshot in self._evaluations.watch(budget.tenant, request.id):
            yield gateway_pb2.WatchEvaluationResponse(evaluation=snapshot)

    async def CancelEvaluation(self, request, context):
        budget = self._authorize(context, Scope.READ)
        return gateway_pb2.CancelEvaluationResponse(evaluation=await self._evaluations.cancel(budget.tenant, request.id))


def _unary_forward(name: str, service: str, method: str, scope: Scope, idempotent: bool):
    response_type = getattr(gateway_pb2, f"GatewayService{name}Response")

    async def forward(self: GatewayServicer, request, context):
        budget = self._authorize(context, scope)
        target = getattr(getattr(self._down, service), method)
        reply = await self._down.unary(service, target, request.request, budget, idempotent=idempotent)
        return response_type(response=reply)

    forward.__name__ = name
    return forward


def _client_stream_forward(name: str, service: str, method: str, scope: Scope):
    response_type = getattr(gateway_pb2, f"GatewayService{name}Response")

    async def forward(self: GatewayServicer, request_iterator, context):
        budget = self._authorize(context, scope)

        async def unwrapped():
            async for item in request_iterator:
                yield item.request

        target = getattr(getattr(self._down, service), method)
        return response_type(response=await self._down.stream_in(service, target, unwrapped(), budget))

    forward.__name__ = name
    return forward


def _server_stream_forward(name: str, service: str, method: str, scope: Scope):
    response_type = getattr(gateway_pb2, f"GatewayService{name}Response")

    async def forward(self: GatewayServicer, request, context):
        budget = self._authorize(context, scope)
        target = getattr(getattr(self._down, service), method)
        async for item in self._down.stream_out(service, target, request.request, budget):
            yield response_type(response=item)

    forward.__name__ = name
    return forward


for _name, (_svc, _method, _scope, _idem) in _FORWARDS.items():
    setattr(GatewayServicer, _name, _unary_forward(_name, _svc, _method, _scope, _idem))
for _name, (_svc, _method, _scope) in _CLIENT_STREAM_FORWARDS.items():
    setattr(GatewayServicer, _name, _client_stream_forward(_name, _svc, _method, _scope))
for _name, (_svc, _method, _scope) in _SERVER_STREAM_FORWARDS.items():
    setattr(GatewayServicer, _name, _server_stream_forward(_name, _svc, _method, _scope))


class GatewayService:
    """Hosts the gateway: loads API keys and the tokenizer, opens channels to the services."""

    service_names = (SERVICE_NAME,)

    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        self.servicer = GatewayServicer(settings)
        self.downstream: Downstream | None = None
        self.evaluations: EvaluationRunner | None = None

    def register(self, server: grpc.aio.Server) -> None:
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        s = self.settings
        keys = ApiKeyStore.load(s.api_keys_file, s.api_keys.get_secret_value() if s.api_keys else None)
        if not len(keys):
            log.warning("no API keys configured: every call will be refused (set RAGTUNE_GATEWAY_API_KEYS_FILE)")
        counter = await asyncio.to_thread(TokenCounter, s.tokenizer_dir or base_model_dir(s.model_cache))
        self.downstream = Downstream(
            s.retriever_address, s.generator_address, s.trainer_address,
            internal_token=s.internal_token.get_secret_value() if s.internal_token else None,
            retry_attempts=s.retry_attempts, retry_backoff_s=s.retry_backoff_s,
        )
        pipeline = AskPipeline(
            self.downstream, counter, default_top_k=s.default_top_k, max_top_k=s.max_top_k,
            default_max_tokens=s.default_max_tokens,
        )
        self.evaluations = EvaluationRunner(pipeline, self.downstream, s.home / "gateway" / "evaluations")
        self.servicer.attach(keys, self.downstream, pipeline, self.evaluations)

    async def stop(self) -> None:
        if self.evaluations is not None:
            await self.evaluations.close()
        if self.downstream is not None:
            await self.downstream.close()
