"""The one way a ragtune service starts, serves and stops.

`ServiceHost` binds a grpc.aio server with health and reflection, maps errors through
`ErrorMappingInterceptor`, warms the service up before reporting SERVING, and shuts down in
order on SIGTERM: health NOT_SERVING -> server.stop(grace) -> service.stop() -> telemetry flush.

Health has two meanings, and the Kubernetes probes use them apart:

- readiness = the health of the named service (e.g. `ragtune.v1.GeneratorService`): SERVING only
  while the service can answer its RPCs now. NOT_SERVING while it warms up, drains on SIGTERM,
  or reports itself not ready (a generator whose engine died), so no new request is routed here;
  while not ready its RPCs answer UNAVAILABLE at once with the reason.
- liveness = the health of the whole server (""): NOT_SERVING only when the service reports that
  it cannot recover without a restart (and while draining), so the kubelet restarts the container.

A service that can tell (it has an async `health()` returning `ServiceHealth`) is asked every
`RAGTUNE_GRPC_HEALTH_CHECK_INTERVAL_S`; one without it is ready from warm-up to shutdown.

The server refuses a port that is already in use (`grpc.so_reuseport` 0: gRPC's default would
let a second instance share the port and report ready), and closes every connection after
`RAGTUNE_GRPC_MAX_CONNECTION_AGE_S` (GOAWAY; calls in flight get the grace period), so clients
reconnect and re-resolve DNS: replicas added behind a headless Service get traffic within
about that bound (k8s/README.md, "How traffic reaches new replicas").

With RAGTUNE_TLS_CERT_FILE / _KEY_FILE the server serves TLS only (and requires client
certificates with RAGTUNE_TLS_CLIENT_CA_FILE): ragtune/tls.py builds the credentials at start.
The kubelet's native gRPC probes cannot speak TLS, so `RAGTUNE_GRPC_HEALTH_PORT` opens a second,
plaintext port that serves grpc.health.v1 only (the same statuses), for the probes.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import hashlib
import hmac
import ipaddress
import logging
import signal
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import grpc
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import metrics

from ragtune import access
from ragtune.access import is_internal_service
from ragtune.errors import PermissionDenied, ServiceError, Unauthenticated, Unavailable
from ragtune.request_limits import RequestLimitInterceptor, largest_request_bytes
from ragtune.settings import ServiceSettings, TLSSettings
from ragtune.telemetry import configure_logging, configure_telemetry, server_interceptors
from ragtune.tenancy import INTERNAL_TOKEN_METADATA_KEY
from ragtune.tls import TLSConfigError, describe, server_credentials

log = logging.getLogger(__name__)

# Health checks and reflection must stay reachable without credentials (Kubernetes probes, grpcurl).
_EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class HostSettings(BaseSettings):
    """How the gRPC server itself behaves, the same for every service (environment RAGTUNE_GRPC_*)."""

    model_config = SettingsConfigDict(env_prefix="RAGTUNE_GRPC_", extra="ignore", frozen=True)

    max_connection_age_s: float = Field(
        30.0,
        gt=0,
        description="Close every client connection after this long (GOAWAY, with gRPC's +-10% jitter), so"
        " clients reconnect and re-resolve DNS and replicas added behind a headless Service get traffic.",
    )
    max_connection_age_grace_s: float | None = Field(
        None,
        gt=0,
        description="How long calls in flight on a closing connection may still run; unset = until they"
        " end (watch streams last as long as a training job). New calls always go to a new connection.",
    )
    health_check_interval_s: float = Field(
        1.0, gt=0, description="How often the host asks a service that can tell whether it is still healthy."
    )
    health_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="When set, a second port, plaintext, serving only grpc.health.v1 (the same statuses as the"
        " main port): for Kubernetes' native gRPC probes, which cannot speak TLS. Unset = none.",
    )


@dataclass(frozen=True)
class ServiceHealth:
    """What a service reports about itself: `ready` to take new RPCs (readiness), `live` unless it cannot
    recover without a restart (liveness), and why not, for logs and for the UNAVAILABLE it answers."""

    ready: bool
    live: bool = True
    reason: str = ""


class PortInUse(RuntimeError):
    """The address to bind is taken: another instance (or something else) listens there."""


class Service(Protocol):
    """What a service gives the host: its servicers, and how to warm up and release resources.
    It may also define `async def health(self) -> ServiceHealth`, which the host polls once SERVING, and
    `async def drain(self)`, which stops another front it serves, while the gRPC server stops."""

    service_names: Sequence[str]  # full names, e.g. "ragtune.v1.RetrieverService"

    def register(self, server: grpc.aio.Server) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def wrap_handler(handler: grpc.RpcMethodHandler, wrap_unary, wrap_stream) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour wrapped (`wrap_unary` for unary responses, `wrap_stream` for streams)."""
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
                except (asyncio.CancelledError, grpc.aio.AbortError, GeneratorExit):
                    raise  # GeneratorExit: the client left the stream; nothing to report
                except BaseException as exc:  # noqa: BLE001
                    await self._abort(context, method, exc)
                finally:
                    self._record(method, started, context)

            return wrapper

        return wrap_handler(handler, wrap_unary, wrap_stream)


def refusal_handler(status: grpc.Status) -> grpc.RpcMethodHandler:
    """A handler that answers `status` without reading a request message, whatever the method's shape."""

    async def deny(request_iterator, context):
        await context.abort(status.code, status.details, status.trailing_metadata)
        yield  # pragma: no cover - makes this an async generator

    return grpc.stream_stream_rpc_method_handler(deny)


class InternalTokenInterceptor(grpc.aio.ServerInterceptor):
    """On an internal service with RAGTUNE_INTERNAL_TOKEN set, accepts calls only from holders of the token
    (the gateway, the trainer). Compares SHA-256 digests in constant time, on the metadata alone, so a call
    without it is refused before its message is read; health and reflection stay open."""

    def __init__(self, token: str):
        self._digest = hashlib.sha256(token.encode()).digest()

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(_EXEMPT_PREFIXES):
            return await continuation(handler_call_details)
        given = dict(handler_call_details.invocation_metadata or ()).get(INTERNAL_TOKEN_METADATA_KEY, "")
        if hmac.compare_digest(hashlib.sha256(str(given).encode()).digest(), self._digest):
            return await continuation(handler_call_details)
        return refusal_handler(Unauthenticated("this service accepts calls only from the ragtune services").to_status())


class CallerIdentityInterceptor(grpc.aio.ServerInterceptor):
    """With mutual TLS, accepts a call only when the client certificate's SAN names an identity the access
    table lets call that method (ragtune/access.py): a certificate the CA signed for the generator cannot call
    the trainer. The TLS handshake already proved the certificate; this decides what it may do."""

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(_EXEMPT_PREFIXES):
            return handler
        rule = access.rule_for(method)
        allowed = rule.callers if rule is not None else frozenset()

        async def check(context) -> None:
            sans = (context.auth_context() or {}).get("x509_subject_alternative_name", ())
            names = [s.decode() if isinstance(s, bytes) else str(s) for s in sans]
            if not any(access.identity_of_san(n) in allowed for n in names):
                who = ", ".join(names) or "no SAN"
                status = PermissionDenied(
                    f"{method} accepts calls from {sorted(i.value for i in allowed) or 'no service'};"
                    f" the client certificate names {who}").to_status()
                await context.abort(status.code, status.details, status.trailing_metadata)

        def wrap_unary(behavior):
            async def wrapper(request, context):
                await check(context)
                return await behavior(request, context)

            return wrapper

        def wrap_stream(behavior):
            async def wrapper(request, context):
                await check(context)
                async for item in behavior(request, context):
                    yield item

            return wrapper

        return wrap_handler(handler, wrap_unary, wrap_stream)


class InsecureInternalService(RuntimeError):
    """An internal service would serve a non-loopback address to anyone: neither a token nor client certificates."""


def internal_identity_interceptors(service_names: Sequence[str], settings: ServiceSettings,
                                   tls: TLSSettings) -> list[Any]:
    """How an internal service checks who calls it: the internal token, and with mutual TLS the certificate's SAN."""
    interceptors: list[Any] = []
    if settings.internal_token is not None:
        interceptors.append(InternalTokenInterceptor(settings.internal_token.get_secret_value()))
    if tls.client_ca_file is not None:
        interceptors.append(CallerIdentityInterceptor())
    return interceptors


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the port on this machine (an empty host or 0.0.0.0 binds every address)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_internal_exposure(settings: ServiceSettings, tls: TLSSettings, name: str) -> None:
    """An internal service bound beyond loopback must verify its callers (token or client certificates):
    otherwise anyone who reaches the port acts for any tenant by naming it in the metadata."""
    if is_loopback(settings.host) or settings.internal_token is not None or tls.client_ca_file is not None:
        return
    raise InsecureInternalService(
        f"refusing to serve the {name} on {settings.address} with no caller check: set RAGTUNE_INTERNAL_TOKEN"
        " (the same value on the gateway) or RAGTUNE_TLS_CLIENT_CA_FILE (mutual TLS), or bind 127.0.0.1")


class ReadinessInterceptor(grpc.aio.ServerInterceptor):
    """The one readiness gate: until the service has warmed up (health SERVING), its RPCs answer
    UNAVAILABLE with a RetryInfo hint instead of reaching half-built state; health and reflection
    stay open."""

    def __init__(self, name: str, retry_after_s: float = 1.0):
        self.ready = False
        self._retry_after_s = retry_after_s
        self._status = Unavailable(f"the {name} is still starting; retry shortly", retry_after_s=retry_after_s).to_status()

    def refuse(self, reason: str) -> None:
        """Stops letting RPCs through, answering UNAVAILABLE with `reason` (the service reported itself unhealthy)."""
        self._status = Unavailable(reason, retry_after_s=self._retry_after_s).to_status()
        self.ready = False

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

        return wrap_handler(handler, lambda _: refuse, lambda _: refuse_stream)


def server_options(host_settings: HostSettings, *, reuse_port: bool = False) -> list[tuple[str, Any]]:
    """The grpc.aio server options every ragtune server runs with."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", largest_request_bytes()),  # per-method limits: ragtune/request_limits.py
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        # gRPC binds with SO_REUSEPORT by default: a second instance on a busy port would share it
        # (the kernel splitting connections between the two) and report SERVING.
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.max_connection_age_ms", int(host_settings.max_connection_age_s * 1000)),
    ]
    if host_settings.max_connection_age_grace_s is not None:
        options.append(("grpc.max_connection_age_grace_ms", int(host_settings.max_connection_age_grace_s * 1000)))
    return options


def _port_env(settings: ServiceSettings) -> str:
    return f"{settings.model_config.get('env_prefix', 'RAGTUNE_')}PORT"


def _bind_error(settings: ServiceSettings, name: str) -> PortInUse | RuntimeError:
    """Why binding failed, in words an operator can act on (gRPC only says it failed)."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((settings.host, settings.port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return PortInUse(
                f"cannot serve the {name} on {settings.address}: the address is already in use (another {name}"
                f" running?); stop it or choose another port with {_port_env(settings)}"
            )
        return RuntimeError(f"cannot serve the {name} on {settings.address}: {exc.strerror}")
    return RuntimeError(f"cannot serve the {name} on {settings.address}: gRPC could not bind it")


class ServiceHost:
    """Runs one Service on a grpc.aio server. Tests use start()/stop() in-process on port 0.

    `host_settings` defaults to HostSettings() (the environment); `reuse_port` lets several servers
    share one address (only tests that model a load-balanced address use it); `tls` defaults to
    TLSSettings() (the environment); `freeze_heap` is for a process that runs this one service (see
    `freeze_startup_heap`)."""

    def __init__(self, service: Service, settings: ServiceSettings, *, name: str, extra_interceptors: Sequence[Any] = (),
                 host_settings: HostSettings | None = None, reuse_port: bool = False, tls: TLSSettings | None = None,
                 freeze_heap: bool = False):
        self.service = service
        self.freeze_heap = freeze_heap
        self.settings = settings
        self.name = name
        self.host_settings = host_settings or HostSettings()
        self.tls = tls or TLSSettings()
        self.health = health.aio.HealthServicer()
        # A service may bring its own (the gateway's access check on API keys), after tracing.
        own = getattr(service, "interceptors", None)
        interceptors: list[Any] = [*server_interceptors(), RequestLimitInterceptor(), *extra_interceptors,
                                   *(own() if own else ())]
        # Service identity is checked on internal services only: the gateway's public port authenticates API keys
        # (gateway/authorization.py), and the token it holds to call the services must not lock its clients out.
        self.internal = is_internal_service(service.service_names)
        if self.internal:
            interceptors.extend(internal_identity_interceptors(service.service_names, settings, self.tls))
        self.readiness = ReadinessInterceptor(name)
        interceptors.append(self.readiness)
        interceptors.append(ErrorMappingInterceptor(name))
        self.server = grpc.aio.server(
            interceptors=interceptors, options=server_options(self.host_settings, reuse_port=reuse_port)
        )
        self.port: int | None = None
        self.health_server: grpc.aio.Server | None = None
        self.health_port: int | None = None
        self.reported = ServiceHealth(ready=False, reason=f"the {name} is still starting")
        self._watcher: asyncio.Task | None = None
        self._stopping = False
        self._stopped = asyncio.Event()

    async def _set_health(self, status: int) -> None:
        for name in ("", *self.service.service_names):
            await self.health.set(name, status)

    async def _apply(self, report: ServiceHealth) -> None:
        """Publishes what the service reported: readiness on the named services, liveness on ""."""
        if self._stopping or report == self.reported:
            return
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        for service_name in self.service.service_names:
            await self.health.set(service_name, serving if report.ready else not_serving)
        await self.health.set("", serving if report.live else not_serving)
        if report.ready:
            self.readiness.ready = True
            log.info("%s is healthy again", self.name)
        else:
            self.readiness.refuse(report.reason or f"the {self.name} is not ready")
            log.warning("%s reports itself %s: %s", self.name, "not ready" if report.live else "unrecoverable", report.reason)
        self.reported = report

    async def check_health(self) -> ServiceHealth:
        """Asks the service now (instead of waiting for the next poll) and publishes the answer."""
        probe = getattr(self.service, "health", None)
        if probe is None:
            return self.reported
        try:
            report = await probe()
        except Exception as exc:  # noqa: BLE001 - a failing health check is itself the answer
            report = ServiceHealth(ready=False, live=True, reason=f"the {self.name}'s health check failed: {exc!r}")
        await self._apply(report)
        return report

    async def _watch_health(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.host_settings.health_check_interval_s)
            await self.check_health()

    async def start(self) -> int:
        """Binds and starts serving health (NOT_SERVING), then warms up and reports SERVING."""
        self.service.register(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*self.service.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            self.server,
        )
        credentials = server_credentials(self.tls)  # TLSConfigError names the setting at fault
        if self.internal:
            check_internal_exposure(self.settings, self.tls, self.name)
        try:
            if credentials is None:
                self.port = self.server.add_insecure_port(self.settings.address)
            else:
                self.port = self.server.add_secure_port(self.settings.address, credentials)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise _bind_error(self.settings, self.name)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.host_settings.health_port is not None:
            await self._start_health_port()
        await self.server.start()
        log.info("listening on %s:%d (%s), warming up", self.settings.host, self.port, describe(self.tls))
        started = time.perf_counter()
        await self.service.start()
        if self.freeze_heap:
            freeze_startup_heap()
        self.readiness.ready = True
        self.reported = ServiceHealth(ready=True)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving after %.1f s warm-up", time.perf_counter() - started)
        if getattr(self.service, "health", None) is not None:
            self._watcher = asyncio.create_task(self._watch_health(), name=f"{self.name}-health")
        return self.port

    async def _start_health_port(self) -> None:
        """The plaintext health-only port: the same HealthServicer, so it reports exactly what the main port does."""
        self.health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
        address = f"{self.settings.host}:{self.host_settings.health_port}"
        try:
            self.health_port = self.health_server.add_insecure_port(address)
        except RuntimeError:
            self.health_port = 0
        if self.health_port == 0:
            raise PortInUse(f"cannot serve the {self.name}'s health port on {address}: the address is in use or"
                            " cannot be bound; choose another with RAGTUNE_GRPC_HEALTH_PORT")
        await self.health_server.start()
        log.info("health (plaintext, grpc.health.v1 only) on %s:%d", self.settings.host, self.health_port)

    async def stop(self, grace: float | None = None) -> None:
        """Refuses new calls, lets in-flight calls finish within the grace period, then releases the service."""
        self._stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        await self.health.enter_graceful_shutdown()
        # A service that serves another front besides gRPC (the gateway's HTTP API) drains it at the same
        # time, so neither keeps accepting requests while the other winds down.
        drain = getattr(self.service, "drain", None)
        await asyncio.gather(self.server.stop(self.settings.grace_period_s if grace is None else grace),
                             *([drain()] if drain is not None else []))
        if self.health_server is not None:
            await self.health_server.stop(0)
        await self.service.stop()
        self._stopped.set()


def freeze_startup_heap() -> None:
    """Moves every object alive after warm-up out of the garbage collector's reach.

    What a service loads at start (torch, transformers, vLLM, LanceDB: 583k objects in the retriever) lives
    as long as the process, yet each full collection walks all of it with every thread stopped: 343 ms in the
    retriever, triggered whenever enough request objects survive (an ingest makes many). Frozen, a full
    collection walks only what was allocated since. Reference counting still frees frozen objects; only
    cycles among them are never collected, and what startup loads is kept to the end anyway."""
    gc.collect()
    gc.freeze()


async def _serve(service_factory, settings: ServiceSettings, name: str) -> None:
    # The server and the service are built inside the running loop: grpc.aio binds to it.
    host = ServiceHost(service_factory(settings), settings, name=name, freeze_heap=True)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    start = asyncio.create_task(host.start())
    waiter = asyncio.create_task(stop_requested.wait())
    done, _ = await asyncio.wait({start, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if start in done:
        try:
            start.result()  # raise a failed warm-up
        except (PortInUse, TLSConfigError, InsecureInternalService) as exc:
            # No stack trace: the message says what to do. A non-zero exit lets a supervisor see it.
            log.error("%s", exc)
            raise SystemExit(2) from None
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
