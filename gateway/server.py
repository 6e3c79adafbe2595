"""The gateway's gRPC servicer: authenticate, authorize the scope, then answer (Ask, Chat,
evaluations, API keys) or forward to the owning service (gateway/forwards.py)."""

from __future__ import annotations

import asyncio
import logging

import grpc

from ragtune.controlplane import Database
from ragtune.controlplane.aliases import AliasStore
from ragtune.controlplane.api_keys import ApiKeyStore, KeyImport, load_key_file
from ragtune.controlplane.evaluations import EvaluationStore
from ragtune.controlplane.jobs import JobStore
from ragtune.errors import InvalidArgument
from ragtune.models import base_model_dir
from ragtune.server import ServiceHealth
from ragtune.v1 import gateway_pb2, gateway_pb2_grpc
from gateway.auth import KeyRefresher, KeyRing, Scope
from gateway.authorization import Admission, AdmitAll, PublicAccessInterceptor, current_principal
from gateway.chat import ChatPipeline
from gateway.downstream import CallBudget, Downstream
from gateway.evaluation.promotion import Promotion
from gateway.evaluation.service import EvaluationService
from gateway.evaluation.spec import validate_gate
from gateway.evaluation.worker import EvaluationWorker
from gateway.fairness import FairGate, FairGenerator
from gateway.forwards import ForwardedRpcs
from gateway.quota_rpcs import QuotaRpcs
from gateway.quotas import QuotaAdmission
from ragtune.controlplane.quotas import QuotaStore
from gateway.rag import AnswerOptions, AskPipeline, TokenCounter
from gateway.settings import GatewaySettings
from gateway.http.context import FrontState
from gateway.http.server import HttpFront
from ragtune.settings import TLSSettings
from ragtune.tls import http_ssl_options

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name
log = logging.getLogger(__name__)

class GatewayServicer(QuotaRpcs, ForwardedRpcs):
    """Registered before the server starts; GatewayService.start() attaches its collaborators
    before health reports SERVING (ServiceHost's readiness gate refuses calls until then)."""

    def __init__(self, settings: GatewaySettings):
        self._settings = settings

    def attach(self, keys: KeyRing, api_keys: ApiKeyStore, downstream: Downstream, pipeline: AskPipeline,
               evaluations: EvaluationService, chat: ChatPipeline | None = None) -> None:
        self._keys, self._api_keys, self._down = keys, api_keys, downstream
        self._pipeline, self._evaluations = pipeline, evaluations
        self._chat = chat

    def _authorize(self, context: grpc.aio.ServicerContext, *more_scopes: Scope) -> CallBudget:
        """The call's budget for the principal the access check admitted (gateway/authorization.py checked the
        method's scope from ragtune/access.py); `more_scopes` are what this request's content needs besides."""
        principal = current_principal()
        for scope in more_scopes:
            principal.require(scope)
        return CallBudget.from_context(context, principal.tenant, self._settings.default_timeout_s,
                                       actor=principal.key_id)

    async def Ask(self, request, context):
        budget = self._authorize(context)
        return await self._pipeline.ask(request.question, budget)

    async def AskStream(self, request, context):
        budget = self._authorize(context)
        async for event in self._pipeline.stream(request.question, budget):
            yield event

    async def Chat(self, request, context):
        budget = self._authorize(context)
        return await self._chat.chat(request.conversation, budget)

    async def ChatStream(self, request, context):
        budget = self._authorize(context)
        async for event in self._chat.stream(request.conversation, budget):
            yield event

    async def CreateJob(self, request, context):
        budget = self._authorize(context)
        await self._quota_admission.check_records(current_principal(), "queued_jobs")
        spec = request.request.spec
        if spec.HasField("gate"):
            # The gate's eval set is read by an evaluation later: refuse a bad one now, line by line.
            validate_gate(spec.gate)
            if spec.gate.collection:
                await self._evaluations.check_collection(spec.gate.collection, budget)
        reply = await self._down.trainer.create_job(request.request, budget)
        return gateway_pb2.GatewayServiceCreateJobResponse(response=reply)

    async def CreateEvaluation(self, request, context):
        # Measuring knowledge-update cost trains an adapter, so it needs the train scope too.
        budget = self._authorize(context, *_evaluation_scopes(request.spec))
        await self._quota_admission.check_records(current_principal(), "running_evaluations")
        evaluation = await self._evaluations.create(budget.tenant, request.spec, budget)
        return gateway_pb2.CreateEvaluationResponse(evaluation=evaluation)

    async def GetEvaluation(self, request, context):
        budget = self._authorize(context)
        return await self._evaluations.get(budget.tenant, _evaluation_id(request.id), request.include_report)

    async def ListEvaluations(self, request, context):
        budget = self._authorize(context)
        return gateway_pb2.ListEvaluationsResponse(evaluations=await self._evaluations.list(budget.tenant))

    async def WatchEvaluation(self, request, context):
        budget = self._authorize(context)
        async for snapshot in self._evaluations.watch(budget.tenant, _evaluation_id(request.id)):
            yield gateway_pb2.WatchEvaluationResponse(evaluation=snapshot)

    async def CancelEvaluation(self, request, context):
        budget = self._authorize(context)
        # Cancelling needs the scope that created it: a read key cannot stop a knowledge-update run.
        spec = await self._evaluations.spec(budget.tenant, _evaluation_id(request.id))
        self._authorize(context, *_evaluation_scopes(spec))
        evaluation = await self._evaluations.cancel(budget.tenant, _evaluation_id(request.id))
        return gateway_pb2.CancelEvaluationResponse(evaluation=evaluation)

    async def CreateApiKey(self, request, context):
        budget = self._authorize(context)
        scopes = _scopes(request.scopes)
        if len(request.name) > 128:
            raise InvalidArgument("name", "must be at most 128 characters")
        key, record = await asyncio.to_thread(self._api_keys.create, budget.tenant, scopes, request.name)
        return gateway_pb2.CreateApiKeyResponse(key=key, api_key=_api_key_message(record))

    async def ListApiKeys(self, request, context):
        budget = self._authorize(context)
        records = await asyncio.to_thread(self._api_keys.list, budget.tenant, request.include_revoked)
        return gateway_pb2.ListApiKeysResponse(api_keys=[_api_key_message(r) for r in records])

    async def RevokeApiKey(self, request, context):
        budget = self._authorize(context)
        if not request.id or len(request.id) > 64:
            raise InvalidArgument("id", "is required (an id from ListApiKeys)")
        record = await asyncio.to_thread(self._api_keys.revoke, budget.tenant, request.id)
        return gateway_pb2.RevokeApiKeyResponse(api_key=_api_key_message(record))


def _evaluation_scopes(spec: gateway_pb2.EvaluationSpec) -> tuple[Scope, ...]:
    return (Scope.TRAIN,) if spec.HasField("knowledge_update") else ()


def _evaluation_id(evaluation_id: str) -> str:
    if not evaluation_id or len(evaluation_id) > 64:
        raise InvalidArgument("id", "is required (an evaluation id)")
    return evaluation_id


def _scopes(scopes) -> list[str]:
    if not scopes:
        raise InvalidArgument("scopes", f"must name at least one of {[s.value for s in Scope]}")
    unknown = [s for s in scopes if s not in {x.value for x in Scope}]
    if unknown:
        raise InvalidArgument("scopes", f"unknown scope(s) {unknown}; known: {[s.value for s in Scope]}")
    return list(scopes)


def _api_key_message(record) -> gateway_pb2.ApiKey:
    return gateway_pb2.ApiKey(
        id=record.id, tenant=record.tenant, scopes=list(record.scopes), name=record.name, prefix=record.prefix,
        source=record.source, create_time=record.create_time, revoke_time=record.revoke_time or 0.0,
    )


class GatewayService:
    """Hosts the gateway: opens the control plane (API keys, evaluations), loads the tokenizer, opens
    channels to the services, and runs this replica's share of the evaluation work."""

    service_names = (SERVICE_NAME,)

    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        self.servicer = GatewayServicer(settings)
        self.database: Database | None = None
        self.downstream: Downstream | None = None
        self.keys: KeyRefresher | None = None
        self.worker: EvaluationWorker | None = None
        self.chat_pipeline: ChatPipeline | None = None  # Chat and ChatStream (the HTTP front's chat too)
        self.http: HttpFront | None = None
        self.http_port: int | None = None  # the HTTP front's bound port (RAGTUNE_GATEWAY_HTTP_PORT=0 picks one)
        self.ring: KeyRing | None = None  # set once the keys are loaded; until then the readiness gate refuses calls
        self.admission: Admission = AdmitAll()
        self.quotas: QuotaAdmission | None = None  # the admission once started (quotas from the control plane)
        self.generation_gate: FairGate | None = None  # fair turns at the generator between tenants

    def register(self, server: grpc.aio.Server) -> None:
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(self.servicer, server)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """The public API's access check (ServiceHost installs it): API key and scope from the access table,
        before a request message is read."""
        return [PublicAccessInterceptor(lambda: self.ring, lambda: self.admission)]

    async def start(self) -> None:
        s = self.settings
        bootstrap = load_key_file(s.api_keys_file, s.api_keys.get_secret_value() if s.api_keys else None)
        self.database = Database.from_settings(s)
        if s.database_migrate:
            await asyncio.to_thread(self.database.migrate, 30.0)
        api_keys = ApiKeyStore(self.database)
        # No keys file configured: the keys it once brought are left as they are (not all revoked).
        imported = KeyImport(0) if bootstrap is None else await asyncio.to_thread(api_keys.import_entries, bootstrap)
        ring = KeyRing(max_staleness_s=s.key_max_staleness_s, retry_after_s=s.key_refresh_s)
        self.keys = KeyRefresher(api_keys, ring, s.key_refresh_s)
        await self.keys.load()
        self.ring = ring
        self.keys.start()
        log.info("API keys: %d active (%d imported from the keys file, %d revoked as no longer in it)",
                 len(ring), imported.added, len(imported.revoked))
        if not len(ring):
            log.warning("no API keys: every call will be refused (set RAGTUNE_GATEWAY_API_KEYS_FILE to bootstrap)")
        counter = await asyncio.to_thread(TokenCounter, s.tokenizer_dir or base_model_dir(s.model_cache))
        self.downstream = Downstream(
            s.retriever_address, s.generator_address, s.trainer_address,
            internal_token=s.internal_token.get_secret_value() if s.internal_token else None,
            retry_attempts=s.retry_attempts, retry_backoff_s=s.retry_backoff_s,
        )
        # Quotas per tenant and key, and fair turns at the generator between tenants (gateway/quotas.py,
        # gateway/fairness.py): both fronts admit through self.admission; every generator call waits its turn.
        quota_store = QuotaStore(self.database)
        self.quotas = QuotaAdmission.from_settings(s, quota_store)
        await self.quotas.start()
        self.admission = self.quotas
        self.generation_gate = FairGate(s.generation_slots, s.generation_per_tenant)
        self.downstream.generator = FairGenerator(self.downstream.generator, self.generation_gate,
                                                  self.quotas.charge_tokens)
        self.servicer.attach_quotas(self.quotas, quota_store)
        pipeline = AskPipeline(
            self.downstream, counter, default_top_k=s.default_top_k, max_top_k=s.max_top_k,
            default_max_tokens=s.default_max_tokens, options=AnswerOptions.from_settings(s),
        )
        self.chat_pipeline = ChatPipeline(pipeline, self.downstream, counter)
        store = EvaluationStore(self.database)
        if s.evaluation_workers:
            promotion = Promotion(AliasStore(self.database), JobStore(self.database))
            self.worker = EvaluationWorker(store, pipeline, self.downstream, s.artifacts, promotion,
                                           slots=s.evaluation_workers, lease_s=s.evaluation_lease_s,
                                           poll_interval_s=s.poll_interval_s,
                                           max_attempts=s.evaluation_max_attempts)
            self.worker.start()
        evaluations = EvaluationService(store, self.downstream, s.artifacts, self.worker, s.poll_interval_s)
        self.servicer.attach(ring, api_keys, self.downstream, pipeline, evaluations, chat=self.chat_pipeline)
        if s.http_port >= 0:  # the OpenAI-compatible HTTP front, on the same keys, channels and pipelines
            self.http = HttpFront(FrontState(s, ring, self.downstream, self.chat_pipeline, admission=self.admission),
                                  http_ssl_options(TLSSettings()), TLSSettings())
            self.http_port = await self.http.start()

    async def drain(self) -> None:
        """Stops the HTTP front (no new requests; those in flight get RAGTUNE_GATEWAY_HTTP_GRACE_S) while
        ServiceHost stops the gRPC server."""
        if self.http is not None:
            await self.http.stop()

    async def stop(self) -> None:
        await self.drain()  # idempotent: already drained when stopped through ServiceHost
        # Running evaluations are handed back first, so another replica resumes them at once.
        if self.worker is not None:
            await self.worker.stop()
        if self.keys is not None:
            await self.keys.stop()
        if self.quotas is not None:
            await self.quotas.stop()
        if self.downstream is not None:
            await self.downstream.close()
        if self.database is not None:
            self.database.dispose()

    async def health(self) -> ServiceHealth:
        """Not ready while the API keys are older than RAGTUNE_GATEWAY_KEY_MAX_STALENESS_S: this replica
        refuses every key then, so traffic should go to replicas that can still load them."""
        stale = self.keys.stale_reason() if self.keys is not None else None
        return ServiceHealth(ready=stale is None, reason=stale or "")
