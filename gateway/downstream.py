"""Calls from the gateway to the retriever, generator and trainer.

Every call carries the caller's tenant (and the internal token, when configured) in metadata,
the time left of the client's deadline as its own deadline, and W3C trace context (through the
OpenTelemetry client interceptors). Idempotent reads are retried on UNAVAILABLE with backoff
while the deadline allows; a dependency that is down answers UNAVAILABLE quickly, naming it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import grpc

from ragtune.errors import DeadlineExceeded, Unavailable
from ragtune.tenancy import tenant_metadata
from ragtune.telemetry import client_interceptors
from ragtune.v1 import generator_pb2_grpc, retriever_pb2_grpc, trainer_pb2_grpc

_RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)

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
)


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


class Downstream:
    """The gateway's channels and stubs, with the one policy for deadlines, metadata and retries."""

    def __init__(self, retriever: str, generator: str, trainer: str, *, internal_token: str | None,
                 retry_attempts: int, retry_backoff_s: float):
        interceptors = client_interceptors()
        self._channels = {
            name: grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS, interceptors=interceptors)
            for name, address in (("retriever", retriever), ("generator", generator), ("trainer", trainer))
        }
        self.retriever = retriever_pb2_grpc.RetrieverServiceStub(self._channels["retriever"])
        self.generator = generator_pb2_grpc.GeneratorServiceStub(self._channels["generator"])
        self.trainer = trainer_pb2_grpc.TrainerServiceStub(self._channels["trainer"])
        self._token = internal_token
        self._attempts = retry_attempts
        self._backoff = retry_backoff_s

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels.values()))

    def _metadata(self, budget: CallBudget) -> tuple[tuple[str, str], ...]:
        return tenant_metadata(budget.tenant, self._token, budget.actor)

    @staticmethod
    def _translate(service: str, exc: grpc.aio.AioRpcError) -> Exception:
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            return Unavailable(f"the {service} is unavailable: {exc.details()}")
        return exc  # passed on with its own code and details by the error interceptor

    async def unary(self, service: str, method: Callable, request: Any, budget: CallBudget, *,
                    idempotent: bool = False) -> Any:
        attempts = self._attempts if idempotent else 1
        delay = self._backoff
        for attempt in range(1, attempts + 1):
            try:
                return await method(request, timeout=budget.remaining(), metadata=self._metadata(budget))
            except grpc.aio.AioRpcError as exc:
                retry = exc.code() in _RETRYABLE and attempt < attempts and budget.deadline - time.monotonic() > delay
                if not retry:
                    raise self._translate(service, exc) from None
            await asyncio.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    async def stream_out(self, service: str, method: Callable, request: Any, budget: CallBudget) -> AsyncIterator[Any]:
        """A server-streaming call; cancelling the consumer cancels the downstream call."""
        call = method(request, timeout=budget.remaining(), metadata=self._metadata(budget))
        try:
            async for item in call:
                yield item
        except grpc.aio.AioRpcError as exc:
            raise self._translate(service, exc) from None
        finally:
            call.cancel()

    async def stream_in(self, service: str, method: Callable, requests: AsyncIterator[Any], budget: CallBudget) -> Any:
        """A client-streaming call fed from an async iterator."""
        try:
            return await method(requests, timeout=budget.remaining(), metadata=self._metadata(budget))
        except grpc.aio.AioRpcError as exc:
            raise self._translate(service, exc) from None
