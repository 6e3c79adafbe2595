"""The gateway's one authorization path, for both fronts: the caller's API key -> principal, the method's or
route's scope from the access table (ragtune/access.py), admission (quotas, fair share), then the call.

On gRPC it runs as a server interceptor on the method name and metadata alone, so a call without a valid
key, or with a key lacking the scope, is refused before its request message is read or parsed. The principal
it admitted is handed to the servicer through a context variable (`current_principal()`), set in the task
that runs the handler.
"""

from __future__ import annotations

import contextvars
import time
from typing import Any, Callable, Iterable, Protocol

import grpc

from gateway.auth import KeyRing, Principal
from ragtune.access import SERVICE_ONLY_FIELDS, Rule, rule_for
from ragtune.errors import PermissionDenied, ServiceError
from ragtune.server import refusal_handler, wrap_handler

_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("ragtune_principal", default=None)

# Health and reflection stay reachable without a key (Kubernetes probes, grpcurl).
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

Release = Callable[[], None]


class Admission(Protocol):
    """Decides whether an authenticated call may start now (quotas, fairness); raises a ServiceError
    (RESOURCE_EXHAUSTED) when it may not. The returned callable is called once when the call ends."""

    async def admit(self, principal: Principal, rule: Rule) -> Release: ...

    async def check_records(self, principal: Principal, limit: str) -> None:
        """Before a call that adds a job, an evaluation or stored data (gateway/quotas.py)."""


class AdmitAll:
    """The admission before the gateway has warmed up (the readiness gate refuses calls then anyway)."""

    async def admit(self, principal: Principal, rule: Rule) -> Release:
        return _nothing

    async def check_records(self, principal: Principal, limit: str) -> None:
        return None


def _nothing() -> None:
    return None


def current_principal() -> Principal:
    """The principal the access check admitted for the call being served."""
    principal = _principal.get()
    if principal is None:  # a handler reached without the interceptor: a wiring bug, never a client's fault
        raise PermissionDenied("this call was not authorized")
    return principal


def authorize(keys: KeyRing, rule: Rule | None, what: str, metadata: Iterable[tuple[str, Any]]) -> Principal:
    """Authenticates the key in `metadata` and checks `rule`'s scope; `what` names the method or route."""
    if rule is None or rule.internal:
        # Not in the table, or a service's own method: never reachable with an API key.
        raise PermissionDenied(f"{what} is not part of the public API")
    principal = keys.authenticate(metadata)
    principal.require(rule.scope)
    return principal


def refuse_service_only_fields(method: str, request: Any) -> None:
    """Refuses a public request that sets a field only a service may set (e.g. `spec.gate_run`)."""
    for path in SERVICE_ONLY_FIELDS.get(method, ()):
        message = request
        *parents, leaf = path.split(".")
        for name in parents:
            if not message.HasField(name):
                break
            message = getattr(message, name)
        else:
            if message.HasField(leaf):
                raise PermissionDenied(f"{path} is set only by the ragtune services, never by a client")


class PublicAccessInterceptor(grpc.aio.ServerInterceptor):
    """Installed on the gateway's public gRPC server only: every method must be in the access table."""

    def __init__(self, keys: Callable[[], KeyRing | None], admission: Callable[[], Admission]):
        # Callables: the key ring and admission are built at warm-up, after the server is constructed.
        self._keys, self._admission = keys, admission

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(_OPEN_PREFIXES):
            return await continuation(handler_call_details)
        keys = self._keys()
        if keys is None:  # still warming up: the readiness gate answers UNAVAILABLE
            return await continuation(handler_call_details)
        rule = rule_for(method)
        try:
            principal = authorize(keys, rule, method, handler_call_details.invocation_metadata or ())
        except ServiceError as error:
            return refusal_handler(error.to_status())
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        metadata = tuple(handler_call_details.invocation_metadata or ())
        recheck = StreamRecheck(lambda: authorize(keys, rule, method, metadata))
        return _with_principal(handler, method, principal, rule, self._admission(), recheck)


class StreamRecheck:
    """Re-checks an open stream's key between the items it sends, at most every RECHECK_S: a key revoked (or
    stripped of the scope) while its stream is open stops the stream with the refusal, instead of streaming on."""

    RECHECK_S = 2.0

    def __init__(self, check: Callable[[], Principal]):
        self._check = check
        self._next = time.monotonic() + self.RECHECK_S

    def __call__(self) -> None:
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.RECHECK_S
            self._check()  # raises the refusal


def _with_principal(handler: grpc.RpcMethodHandler, method: str, principal: Principal, rule: Rule,
                    admission: Admission, recheck: StreamRecheck) -> grpc.RpcMethodHandler:
    """Runs the handler with the principal set and inside the admission (released when the call ends)."""

    async def enter(request, context) -> tuple[contextvars.Token, Release]:
        """Sets the principal and enters the admission; a refusal aborts the call with its status."""
        token = _principal.set(principal)
        try:
            if not hasattr(request, "__aiter__"):
                refuse_service_only_fields(method, request)
            return token, await admission.admit(principal, rule)
        except ServiceError as error:
            await _abort(context, error)

    def wrap_unary(behavior):
        async def wrapper(request, context):
            token, release = await enter(request, context)
            try:
                return await behavior(request, context)
            finally:
                release()
                _principal.reset(token)

        return wrapper

    def wrap_stream(behavior):
        async def wrapper(request, context):
            token, release = await enter(request, context)
            try:
                async for item in behavior(request, context):
                    try:
                        recheck()
                    except ServiceError as error:
                        await _abort(context, error)
                    yield item
            finally:
                release()
                _principal.reset(token)

        return wrapper

    return wrap_handler(handler, wrap_unary, wrap_stream)


async def _abort(context, error: ServiceError) -> None:
    status = error.to_status()
    await context.abort(status.code, status.details, status.trailing_metadata)
