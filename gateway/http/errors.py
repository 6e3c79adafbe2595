"""Errors as OpenAI returns them: {"error": {"message", "type", "param", "code"}} with the HTTP status
that matches the gRPC status the gateway would have answered with (the one mapping for the HTTP front)."""

from __future__ import annotations

import logging
import math
import uuid

import grpc
from starlette.responses import JSONResponse

from ragtune.errors import ServiceError, bad_request_violations

log = logging.getLogger(__name__)

# gRPC status -> (HTTP status, OpenAI error type)
_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.ABORTED: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
_CODES = {grpc.StatusCode.UNAUTHENTICATED: "invalid_api_key"}

# Downstream services name their request fields; the HTTP caller knows them by OpenAI's names.
_PARAMS = {"adapter": "model", "input.prompt": "prompt", "input.chat.messages": "messages", "texts": "input",
           "spec.dataset": "training_file", "spec.adapter_name": "suffix", "name": "file"}


class HttpError(ServiceError):
    """An error with only an HTTP meaning (an unknown route, a method not allowed)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.type, self.error_code = status, type_, code


def openai_param(field: str) -> str:
    """The OpenAI request field a downstream field violation is about."""
    for wrapper in ("conversation.", "question.", "request."):
        field = field.removeprefix(wrapper)
    if field in _PARAMS:
        return _PARAMS[field]
    if field.startswith("retrieval."):
        return "ragtune." + field[len("retrieval."):]
    for prefix in ("sampling.structured_output", "sampling."):
        if field.startswith(prefix):
            return "response_format" if prefix == "sampling.structured_output" else field[len(prefix):]
    return field


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def describe(exc: BaseException) -> tuple[int, dict, dict[str, str]]:
    """(HTTP status, OpenAI error body, extra headers) for an exception raised while answering."""
    headers: dict[str, str] = {}
    if isinstance(exc, HttpError):
        return exc.status, error_body(exc.message, exc.type, None, exc.error_code), headers
    if isinstance(exc, ServiceError):
        code, message, violations = exc.code, exc.message, list(exc.violations)
        if exc.retry_after_s is not None:
            # Whole seconds, rounded up: a client that waits what it is told must find the quota refilled.
            headers["retry-after"] = str(max(1, math.ceil(exc.retry_after_s)))
    elif isinstance(exc, grpc.aio.AioRpcError):
        code, message, violations = exc.code(), exc.details() or exc.code().name, bad_request_violations(exc)
    else:
        ref = uuid.uuid4().hex[:12]
        log.error("unhandled error in the HTTP front (ref %s)", ref, exc_info=exc)
        return 500, error_body(f"internal error (ref {ref})", "server_error", None, "internal_error"), headers
    status, type_ = _HTTP.get(code, (500, "server_error"))
    if status == 500:
        message = "internal error"  # a downstream INTERNAL/UNKNOWN already says no more than this
    param = openai_param(violations[0].field) if violations else None
    if code == grpc.StatusCode.NOT_FOUND and message.startswith("adapter"):  # the registry names its field
        return status, error_body(message, type_, "model", "model_not_found"), headers
    return status, error_body(message, type_, param, _CODES.get(code, code.name.lower())), headers


def error_response(exc: BaseException) -> JSONResponse:
    status, body, headers = describe(exc)
    return JSONResponse(body, status_code=status, headers=headers)
