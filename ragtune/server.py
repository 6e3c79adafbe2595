"""The one way a ragtune service starts, serves and stops.

`ServiceHost` binds a grpc.aio server with health and reflection, maps errors through
`ErrorMappingInterceptor`, warms the service up before reporting SERVING, and shuts down in
order on SIGTERM: health NOT_SERVING -> server.stop(grace) -> service.stop() -> telemetry flush.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import signal
import time
import uuid
from typing import Any, Protocol, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import metrics

from ragtune.errors import ServiceError, Unauthenticated, Unavailable
from ragtune.settings import ServiceSettings
from ragtune.telemetry import configure_logging, configure_telemetry, server_interceptors
from ragtune.tenancy import INTERNAL_TOKEN_METADATA_KEY

log = logging.getLogger(__name__)

# Health checks and reflection must stay reachable without credentials (Kubernetes probes, grpcurl).
_EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class Service(Protocol):
    """What a service gives the host: its servicers, and how to warm up and release resources."""

    service_names: Sequence[str]  # full names, e.g. "ragtune.v1.RetrieverService"

    def register(self, server: grpc.aio.Server) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def _wrap_handler(handler: grpc.RpcMethodHandler, wrap_unary, wrap_stream) -> grpc.RpcMethodHandler:
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            wrap_unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            wrap_unary(handler.stream_unary), handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            wrap_stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        wrap_stream(handler.stream_stream), handler.request_deserializer, handler.response_serializer
    )


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions to statuses: ServiceError -> its code and BadRequest details; a downstream
    RpcError -> its code passed on; anything else -> INTERNAL with a reference id (logged with the
    stack trace, never sent). Also records per-RPC duration and outcome as metrics."""

    def __init__(self, service: str):
        meter = metrics.get_meter("ragtune.server")
        self._duration = meter.create_histogram("ragtune.rpc.server.duration", unit="ms")
        self._service = service

    async def _abort(self, context, method: str, exc: BaseException) -> None:
        if isinstance(exc, ServiceError):
            status = exc.to_status()
            await context.abort(status.code, status.details, status.trailing_metadata)
        if isinstance(exc, grpc.aio.AioRpcError):
            code = exc.code()
            if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.OK):
                code = grpc.StatusCode.INTERNAL
            # Keep only the rich error details of the downstream status (aio gives a Metadata object).
            passed = tuple((k, v) for k, v in (exc.trailing_metadata() or ()) if k == "grpc-status-details-bin")
            await context.abort(code, exc.details() or code.name, passed)
        if isinstance(exc, NotImplementedError):
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented")
        ref = uuid.uuid4().hex[:12]
        log.error("unhandled error in %s (ref %s)", method, ref, exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error (ref {ref})")

    def _record(self, method: str, started: float, context) -> None:
        code = context.code() if hasattr(context, "code") else None
        self._duration.record(
            (time.perf_counter() - started) * 1000,
            {"rpc.method": method, "rpc.grpc.status_code": str(getattr(code, "name", code or "OK"))},
        )

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_EXEMPT_PREFIXES):
            return handler
        method = handler_call_details.method

        def wrap_unary(behavior):
            async def wrapper(request, context):
                started = time.perf_counter()
                try:
                    return await behavior(request, context)
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except BaseException as exc:  # noqa: BLE001 - every error must become a status
                    await self._abort(context, method, exc)
                finally:
                    self._record(method, started, context)

            return wrapper

        def wrap_stream(behavior):
            async def wrapper(request, context):
                started = time.perf_counter()
                try:
                    async for item in behavior(request, context):
                        yield item
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except BaseException as exc:  # noqa: BLE001
                    await self._abort(context, method, exc)
                finally:
                    self._record(method, started, context)

            return wrapper

        return _wrap_handler(handler, wrap_unary, wrap_stream)


class InternalTokenInterceptor(grpc.aio.ServerInterceptor):
    """When RAGTUNE_INTERNAL_TOKEN is set, accepts calls only from holders of the token (the gateway).
    Compares SHA-256 digests in constant time; health and reflection stay open."""

    def __init__(self, token: str):
        self._digest = hashlib.sha256(token.encode()).digest()

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(_EXEMPT_PREFIXES):
            return await continuation(handler_call_details)
        given = dict(handler_call_details.invocation_metadata or ()).get(INTERNAL_TOKEN_METADATA_KEY, "")
        if hmac.compare_digest(hashlib.sha256(str(given).encode()).digest(), self._digest):
            return await continuation(handler_call_details)
        status = Unauthenticated("this service accepts calls only from the ragtune gateway").to_status()

        async def deny(request, context):
            await context.abort(status.code, status.details, status.trailing_metadata)

        return grpc.unary_unary_rpc_method_handler(deny)


class ReadinessInterceptor(grpc.aio.ServerInterceptor):
    """The one readiness gate: until the service has warmed up (health SERVING), its RPCs answer
    UNAVAILABLE with a RetryInfo hint instead of reaching half-built state; health and reflection
    stay open."""

    def __init__(self, name: str, retry_after_s: float = 1.0):
        self.ready = False
        self._status = Unavailable(f"the {name} is still starting; retry shortly", retry_after_s=retry_after_s).to_status()

    async def intercept_service(self, continuation, handler_call_details):
        if self.ready or handler_call_details.method.startswith(_EXEMPT_PREFIXES):
            return await continuation(handler_call_details)
        status = self._status
        handler = await continuation(handler_call_details)
        if handler is None:
            return None

        async def refuse(request, context):
            await context.abort(status.code, status.details, status.trailing_metadata)

        async def refuse_stream(request, context):
            await context.abort(status.code, status.details, status.trailing_metadata)
            yield  # pragma: no cover - makes this an async generator, as streaming handlers are

        return _wrap_handler(handler, lambda _: refuse, lambda _: refuse_stream)


class ServiceHost:
    """Runs one Service on a grpc.aio server. Tests use start()/stop() in-process on port 0."""

    def __init__(self, service: Service, settings: ServiceSettings, *, name: str, extra_interceptors: Sequence[Any] = ()):
        self.service = service
        self.settings = settings
        self.name = name
        self.health = health.aio.HealthServicer()
        interceptors: list[Any] = [*server_interceptors(), *extra_interceptors]
        if settings.internal_token is not None:
            interceptors.append(InternalTokenInterceptor(settings.internal_token.get_secret_value()))
        self.readiness = ReadinessInterceptor(name)
        interceptors.append(self.readiness)
        interceptors.append(ErrorMappingInterceptor(name))
        self.server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ],
        )
        self.port: int | None = None
        self._stopped = asyncio.Event()

    async def _set_health(self, status: int) -> None:
        for name in ("", *self.service.service_names):
            await self.health.set(name, status)

    async def start(self) -> int:
        """Binds and starts serving health (NOT_SERVING), then warms up and reports SERVING."""
        self.service.register(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*self.service.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            self.server,
        )
        self.port = self.server.add_insecure_port(self.settings.address)
        if self.port == 0:
            raise RuntimeError(f"could not bind {self.settings.address}")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        log.info("listening on %s:%d, warming up", self.settings.host, self.port)
        started = time.perf_counter()
        await self.service.start()
        self.readiness.ready = True
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving after %.1f s warm-up", time.perf_counter() - started)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Refuses new calls, lets in-flight calls finish within the grace period, then releases the service."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.grace_period_s if grace is None else grace)
        await self.service.stop()
        self._stopped.set()


async def _serve(service_factory, settings: ServiceSettings, name: str) -> None:
    # The server and the service are built inside the running loop: grpc.aio binds to it.
    host = ServiceHost(service_factory(settings), settings, name=name)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    start = asyncio.create_task(host.start())
    waiter = asyncio.create_task(stop_requested.wait())
    done, _ = await asyncio.wait({start, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if start in done:
        start.result()  # raise a failed warm-up
        log.info("ready", extra={"fields": {"port": host.port}})
        await waiter
    else:
        start.cancel()
    log.info("shutting down (grace %.1f s)", host.settings.grace_period_s)
    await host.stop()
    log.info("stopped")


def run_service(service_factory, settings: ServiceSettings, *, name: str) -> None:
    """Entry point of `python -m services.X`: logging, telemetry, serve until SIGTERM."""
    configure_logging(name, settings.log_level, settings.log_format)
    telemetry = configure_telemetry(name)
    try:
        asyncio.run(_serve(service_factory, settings, name))
    finally:
        telemetry.shutdown()
