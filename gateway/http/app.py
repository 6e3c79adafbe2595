"""The ASGI app of the OpenAI-compatible front: its routes, OpenAI-shaped errors for every failure,
and one OpenTelemetry server span per request (joined to the caller's W3C trace context)."""

from __future__ import annotations

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from gateway.authorization import StreamRecheck, authorize
from gateway.http import chat_completions, completions, embeddings, files, fine_tuning, models
from gateway.http.context import FrontState
from gateway.http.errors import HttpError, error_response
from gateway.http.limits import BodyLimitMiddleware
from gateway.http.sse import error_event
from ragtune.access import HTTP_ROUTES
from ragtune.errors import ServiceError

_tracer = trace.get_tracer("ragtune.gateway.http")


class TracingMiddleware:
    """A plain ASGI middleware (no per-request task or buffering): the span covers the whole response,
    a stream included, so the gRPC client spans of the downstream calls are its children."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())
                   if k in (b"traceparent", b"tracestate")}
        method = scope["method"]
        with _tracer.start_as_current_span(f"{method} {scope['path']}", context=propagate.extract(carrier),
                                           kind=SpanKind.SERVER, record_exception=False,
                                           set_status_on_exception=False) as span:
            span.set_attribute("http.request.method", method)
            span.set_attribute("url.path", scope["path"])

            async def traced_send(message):
                if message["type"] == "http.response.start":
                    status = message["status"]
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(Status(StatusCode.ERROR))
                await send(message)

            await self.app(scope, receive, traced_send)


async def _not_routed(request: Request, exc: HTTPException):
    """An unknown route or a method it does not take, in OpenAI's error shape."""
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return error_response(HttpError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind))


def _answering(endpoint, method: str, path: str):
    """The route's access check (its rule in ragtune/access.py: key, scope, admission) before the body is read;
    every error becomes OpenAI's error JSON here, with the status of the one mapping."""
    rule = HTTP_ROUTES.get((method, path))

    async def answer(request: Request):
        release = None
        try:
            front: FrontState = request.app.state.front
            principal = authorize(front.keys, rule, f"{method} {path}", request.headers.items())
            release = await front.admission.admit(principal, rule)
            request.state.principal = principal
            response = await endpoint(request)
        except Exception as exc:  # noqa: BLE001 - unexpected ones become a 500 with a reference, logged
            if release is not None:
                release()
            return error_response(exc)
        recheck = StreamRecheck(lambda: authorize(front.keys, rule, f"{method} {path}", request.headers.items()))
        return _released_when_sent(response, release, recheck)

    answer.__name__ = endpoint.__name__
    return answer


def _released_when_sent(response: Response, release, recheck: StreamRecheck) -> Response:
    """A streamed response holds its admission (a concurrent stream) until its last event is sent, and ends
    early, with an error event, when its key is revoked meanwhile."""
    if not isinstance(response, StreamingResponse):
        release()
        return response
    body = response.body_iterator

    async def releasing():
        try:
            async for chunk in body:
                try:
                    recheck()
                except ServiceError as error:
                    yield error_event(error)
                    return
                yield chunk
        finally:
            release()

    response.body_iterator = releasing()
    return response


def build_app(front: FrontState) -> Starlette:
    table = (
        ("/v1/models", models.list_models, ["GET"]),
        ("/v1/models/{model:path}", models.get_model, ["GET"]),
        ("/v1/chat/completions", chat_completions.chat_completions, ["POST"]),
        ("/v1/completions", completions.completions, ["POST"]),
        ("/v1/embeddings", embeddings.embeddings, ["POST"]),
        ("/v1/files", files.upload_file, ["POST"]),
        ("/v1/fine_tuning/jobs", fine_tuning.create_job, ["POST"]),
        ("/v1/fine_tuning/jobs", fine_tuning.list_jobs, ["GET"]),
        ("/v1/fine_tuning/jobs/{job_id}", fine_tuning.get_job, ["GET"]),
        ("/v1/fine_tuning/jobs/{job_id}/cancel", fine_tuning.cancel_job, ["POST"]),
        ("/v1/fine_tuning/jobs/{job_id}/events", fine_tuning.list_events, ["GET"]),
        ("/v1/fine_tuning/jobs/{job_id}/checkpoints", fine_tuning.list_checkpoints, ["GET"]),
    )
    routes = [Route(path, _answering(endpoint, method, path), methods=[method])
              for path, endpoint, methods in table for method in methods]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _not_routed})
    app.state.front = front
    app.add_middleware(BodyLimitMiddleware)  # per-route body caps, inside tracing so a 413 is traced too
    app.add_middleware(TracingMiddleware)
    return app
