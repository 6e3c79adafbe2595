"""The gateway's typed clients of the retriever, generator and trainer.

Each downstream method is declared once, with whether it is safe to send again (`retry=True`: it
changes nothing). Retries are gRPC's own: the channel's service config gives the safe methods a
retry policy on UNAVAILABLE, bounded by the call's deadline, which is what remains of the client's.
Every call carries the caller's tenant, its key id (for audit trails) and the internal token in
metadata, and W3C trace context through the OpenTelemetry client interceptors. A dependency that is
down answers UNAVAILABLE naming it. The channels use TLS (mutual TLS with a client certificate)
when RAGTUNE_TLS_CA_FILE is set (ragtune/tls.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

import grpc

from ragtune.errors import DeadlineExceeded, ServiceError, Unavailable
from ragtune.settings import TLSSettings
from ragtune.telemetry import client_interceptors
from ragtune.tenancy import tenant_metadata
from ragtune.tls import aio_channel
from ragtune.v1 import generator_pb2_grpc, retriever_pb2_grpc, trainer_pb2_grpc

log = logging.getLogger(__name__)

# How the gateway's channels find and spread over the replicas of a downstream service. With a
# `dns:///name:port` address of a headless Kubernetes Service every ready pod resolves:
# round_robin sends calls to all of them. gRPC resolves the name again when a connection closes;
# the servers close each connection after RAGTUNE_GRPC_MAX_CONNECTION_AGE_S (GOAWAY), and the
# resolver waits at least DNS_MIN_RESOLUTION_INTERVAL_MS between two resolutions (gRPC's default
# is 30 s), so a replica added by the autoscaler gets calls within about
# 1.1 x max_connection_age + this interval + the DNS TTL (k8s/README.md).
DNS_MIN_RESOLUTION_INTERVAL_MS = 10_000
CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.dns_min_time_between_resolutions_ms", DNS_MIN_RESOLUTION_INTERVAL_MS),
    ("grpc.enable_retries", 1),
)
MAX_RETRY_ATTEMPTS = 5  # gRPC caps a retry policy's maxAttempts at 5


class DeploymentFault(ServiceError):
    """The gateway's own call was refused by a service it depends on (credentials): INTERNAL to the client."""

    code = grpc.StatusCode.INTERNAL


@dataclass
class CallBudget:
    """The deadline a downstream call inherits from the client's call, and whom it acts for."""

    tenant: str
    deadline: float  # time.monotonic() value
    actor: str = ""  # the API key id, for audit trails downstream

    @classmethod
    def from_context(cls, context: grpc.aio.ServicerContext, tenant: str, default_timeout_s: float,
                     actor: str = "") -> "CallBudget":
        remaining = context.time_remaining()
        if remaining is None:
            remaining = default_timeout_s
        return cls(tenant=tenant, deadline=time.monotonic() + min(remaining, default_timeout_s * 10), actor=actor)

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("the request's deadline passed before a downstream call could start")
        return left


class _Rpc:
    """One downstream method, declared on a client class; `retry` marks it safe to send again."""

    kind = "unary"

    def __init__(self, method: str, *, retry: bool = False):
        self.method = method
        self.retry = retry

    def __set_name__(self, owner: type, attribute: str) -> None:
        owner.RPCS = {**getattr(owner, "RPCS", {}), attribute: self}

    def __get__(self, client: "ServiceClient | None", owner: type):
        if client is None:
            return self
        if self.kind == "unary":
            return lambda request, budget: client._unary(self.method, request, budget)
        if self.kind == "server_stream":
            return lambda request, budget: client._stream_out(self.method, request, budget)
        return lambda requests, budget: client._stream_in(self.method, requests, budget)


class Unary(_Rpc):
    kind = "unary"


class ServerStream(_Rpc):
    kind = "server_stream"


class ClientStream(_Rpc):
    kind = "client_stream"


class ServiceClient:
    """The calls of one downstream service over one channel; subclasses declare the methods."""

    name: str  # as error messages name it: "the retriever is unavailable"
    service: str  # full proto service name, for the service config
    stub_type: type
    RPCS: dict[str, _Rpc] = {}

    def __init__(self, channel: grpc.aio.Channel, internal_token: str | None):
        self._stub = self.stub_type(channel)
        self._token = internal_token

    @classmethod
    def retried_methods(cls) -> list[str]:
        return sorted(rpc.method for rpc in cls.RPCS.values() if rpc.retry)

    def _metadata(self, budget: CallBudget) -> tuple[tuple[str, str], ...]:
        return tenant_metadata(budget.tenant, self._token, budget.actor)

    def _translate(self, exc: grpc.aio.AioRpcError) -> Exception:
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            return Unavailable(f"the {self.name} is unavailable: {exc.details()}")
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            # The service refused the gateway itself (token or certificate), not the client's key: a deployment
            # fault the client cannot fix, so never passed on as the client's own UNAUTHENTICATED.
            log.error("the %s refused the gateway's call as unauthenticated (%s): RAGTUNE_INTERNAL_TOKEN or the TLS"
                      " client certificate differs between the gateway and the %s", self.name, exc.details(), self.name)
            return DeploymentFault(f"the gateway cannot call the {self.name}: its service credentials were refused"
                                   " (a deployment fault; the operator is told in the gateway's log)")
        return exc  # passed on with its own code and details by the error interceptor

    async def _unary(self, method: str, request: Any, budget: CallBudget) -> Any:
        try:
            return await getattr(self._stub, method)(request, timeout=budget.remaining(),
                                                     metadata=self._metadata(budget))
        except grpc.aio.AioRpcError as exc:
            raise self._translate(exc) from None

    async def _stream_out(self, method: str, request: Any, budget: CallBudget) -> AsyncIterator[Any]:
        """A server-streaming call; cancelling the consumer cancels the downstream call."""
        call = getattr(self._stub, method)(request, timeout=budget.remaining(), metadata=self._metadata(budget))
        try:
            async for item in call:
                yield item
        except grpc.aio.AioRpcError as exc:
            raise self._translate(exc) from None
        finally:
            call.cancel()

    async def _stream_in(self, method: str, requests: AsyncIterator[Any], budget: CallBudget) -> Any:
        """A client-streaming call fed from an async iterator."""
        try:
            return await getattr(self._stub, method)(requests, timeout=budget.remaining(),
                                                     metadata=self._metadata(budget))
        except grpc.aio.AioRpcError as exc:
            raise self._translate(exc) from None


class RetrieverClient(ServiceClient):
    name, service, stub_type = "retriever", "ragtune.v1.RetrieverService", retriever_pb2_grpc.RetrieverServiceStub
    create_collection = Unary("CreateCollection")
    get_collection = Unary("GetCollection", retry=True)
    list_collections = Unary("ListCollections", retry=True)
    delete_collection = Unary("DeleteCollection")
    upsert_documents = Unary("UpsertDocuments")
    ingest = ClientStream("Ingest")
    delete_documents = Unary("DeleteDocuments")
    search = Unary("Search", retry=True)
    get_collection_stats = Unary("GetCollectionStats", retry=True)
    embed = Unary("Embed", retry=True)


class GeneratorClient(ServiceClient):
    name, service, stub_type = "generator", "ragtune.v1.GeneratorService", generator_pb2_grpc.GeneratorServiceStub
    # Not retried: a generation holds an engine slot; the client decides whether to ask again.
    generate = Unary("Generate")
    generate_stream = ServerStream("GenerateStream")
    load_adapter = Unary("LoadAdapter")
    unload_adapter = Unary("UnloadAdapter")
    list_adapters = Unary("ListAdapters", retry=True)
    get_model_info = Unary("GetModelInfo", retry=True)


class TrainerClient(ServiceClient):
    name, service, stub_type = "trainer", "ragtune.v1.TrainerService", trainer_pb2_grpc.TrainerServiceStub
    create_job = Unary("CreateJob")
    get_job = Unary("GetJob", retry=True)
    list_jobs = Unary("ListJobs", retry=True)
    cancel_job = Unary("CancelJob")
    watch_job = ServerStream("WatchJob")
    validate_dataset = Unary("ValidateDataset", retry=True)
    upload_dataset = ClientStream("UploadDataset")
    list_adapters = Unary("ListAdapters", retry=True)
    get_adapter = Unary("GetAdapter", retry=True)
    delete_adapter = Unary("DeleteAdapter")
    set_adapter_alias = Unary("SetAdapterAlias")
    get_adapter_alias = Unary("GetAdapterAlias", retry=True)
    rollback_adapter_alias = Unary("RollbackAdapterAlias")


def service_config(client: type[ServiceClient], attempts: int, backoff_s: float) -> str:
    """gRPC's service config for one channel: replicas followed by their health, the client's safe methods
    retried on UNAVAILABLE."""
    methods = client.retried_methods()
    # Client-side health checking: each subchannel watches the replica's grpc.health.v1 status for this service
    # (the readiness the host publishes: NOT_SERVING while warming up, draining, or with a dead engine), and
    # round_robin skips the ones not SERVING, so a broken replica stops getting calls within a second or so
    # instead of failing its share until Kubernetes' probes take it out of the Service.
    health = {"healthCheckConfig": {"serviceName": client.service}}
    if attempts < 2 or not methods:
        return json.dumps({**health, "methodConfig": []})
    return json.dumps({**health, "methodConfig": [{
        "name": [{"service": client.service, "method": m} for m in methods],
        "retryPolicy": {
            "maxAttempts": min(attempts, MAX_RETRY_ATTEMPTS),
            "initialBackoff": f"{max(backoff_s, 0.001):.3f}s",
            "maxBackoff": f"{max(backoff_s, 0.001) * 8:.3f}s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }]})


class Downstream:
    """The gateway's three clients, one channel each."""

    def __init__(self, retriever: str, generator: str, trainer: str, *, internal_token: str | None,
                 retry_attempts: int, retry_backoff_s: float, tls: TLSSettings | None = None):
        interceptors = client_interceptors()
        tls = tls or TLSSettings()
        self._channels: list[grpc.aio.Channel] = []

        def open_client(client: type[ServiceClient], address: str):
            options = (*CHANNEL_OPTIONS, ("grpc.service_config", service_config(client, retry_attempts, retry_backoff_s)))
            channel = aio_channel(address, tls, options=options, interceptors=interceptors)
            self._channels.append(channel)
            return client(channel, internal_token)

        self.retriever: RetrieverClient = open_client(RetrieverClient, retriever)
        self.generator: GeneratorClient = open_client(GeneratorClient, generator)
        self.trainer: TrainerClient = open_client(TrainerClient, trainer)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels))
