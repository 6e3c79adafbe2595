"""How large one incoming gRPC message may be, per method, checked on its raw bytes before it is parsed.

Every method accepts `RAGTUNE_GRPC_MAX_REQUEST_BYTES` (1 MiB) unless the table below gives it more; a stream
is checked message by message, so an Ingest or UploadDataset stream of any length passes when each of its
messages does. The server itself never buffers a message larger than the largest limit
(`largest_request_bytes`, the server-wide `grpc.max_receive_message_length`).

An oversize message is refused with RESOURCE_EXHAUSTED naming the method and its limit, and one that is not
valid protobuf with INVALID_ARGUMENT. Raising in a deserializer would not do: grpc.aio answers that with
UNKNOWN ("Unexpected <class ...>") and logs a stack trace. So the deserializer returns a `RefusedRequest`
marker instead of a message, and the behaviour, wrapped here, answers the refusal when it meets the marker.
"""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass
from typing import Any, AsyncIterator

import grpc
from google.protobuf.message import DecodeError
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ragtune.errors import InvalidArgument, ResourceExhausted, ServiceError

MiB = 1 << 20

# Methods that need more than the default, with why. A gateway method forwards its inner request to the owning
# service, so the service's row is never smaller than the gateway's.
_PROMPT = 4 * MiB  # a conversation as long as a 128k-token context window holds, or a full Embed batch (256 texts)
_GENERATION = 8 * MiB  # what the gateway's chat or question accepts plus the passages it adds to the prompt
_DOCUMENTS = 16 * MiB  # a batch of 16 documents (the CLI's) of up to the retriever's 1 MB maximum each
_UPLOAD_CHUNK = 2 * MiB  # one message of an UploadDataset stream: clients send the file in 1 MiB chunks
_JOB = 17 * MiB  # a promotion gate's eval set of up to 16 MiB (services/trainer/jobspec.py), and the rest of the spec

BUILT_IN_LIMITS: dict[str, int] = {
    "ragtune.v1.GatewayService/Ask": _PROMPT,
    "ragtune.v1.GatewayService/AskStream": _PROMPT,
    "ragtune.v1.GatewayService/Chat": _PROMPT,
    "ragtune.v1.GatewayService/ChatStream": _PROMPT,
    "ragtune.v1.GatewayService/Embed": _PROMPT,
    "ragtune.v1.RetrieverService/Embed": _PROMPT,
    "ragtune.v1.RetrieverService/Search": _PROMPT,  # the query of an Ask or a chat's last message
    "ragtune.v1.GeneratorService/Generate": _GENERATION,
    "ragtune.v1.GeneratorService/GenerateStream": _GENERATION,
    "ragtune.v1.GatewayService/UpsertDocuments": _DOCUMENTS,
    "ragtune.v1.GatewayService/Ingest": _DOCUMENTS,
    "ragtune.v1.RetrieverService/UpsertDocuments": _DOCUMENTS,
    "ragtune.v1.RetrieverService/Ingest": _DOCUMENTS,
    # An eval set (at most 1000 questions) and a knowledge update's facts, which go to UpsertDocuments in one call.
    "ragtune.v1.GatewayService/CreateEvaluation": _DOCUMENTS,
    "ragtune.v1.GatewayService/UploadDataset": _UPLOAD_CHUNK,
    "ragtune.v1.TrainerService/UploadDataset": _UPLOAD_CHUNK,
    "ragtune.v1.GatewayService/CreateJob": _JOB,
    "ragtune.v1.TrainerService/CreateJob": _JOB,
}

# Room above the largest limit for the server-wide cap, so a message just over a method's limit gets this
# module's answer (naming the method and the setting) rather than gRPC's own "larger than max".
_SERVER_MARGIN = 64 * 1024


class RequestLimitSettings(BaseSettings):
    """The request size limits an operator may raise or lower (environment RAGTUNE_GRPC_*)."""

    model_config = SettingsConfigDict(env_prefix="RAGTUNE_GRPC_", extra="ignore", frozen=True)

    max_request_bytes: int = Field(
        MiB,
        ge=1,
        description="Largest request message, in bytes, of every method without a larger built-in limit"
        " (ragtune/request_limits.py lists those); raising it raises every method to at least this much.",
    )
    method_max_request_bytes: dict[str, int] = Field(
        default_factory=dict,
        description='Per-method or per-service limits in bytes, JSON, e.g. {"ragtune.v1.RetrieverService/'
        'UpsertDocuments": 33554432, "ragtune.v1.TrainerService": 4194304}; they replace the built-in and'
        " default limits of what they name (a method\'s own entry wins over its service\'s).",
    )

    @field_validator("method_max_request_bytes")
    @classmethod
    def _names_and_sizes(cls, value: dict[str, int]) -> dict[str, int]:
        clean = {}
        for name, size in value.items():
            key = name.strip().lstrip("/")
            if not key or "." not in key.split("/", 1)[0] or key.count("/") > 1:
                raise ValueError(f"{name!r}: name a method as package.Service/Method or a service as package.Service")
            if size < 1:
                raise ValueError(f"{name!r}: the limit must be at least 1 byte, not {size}")
            clean[key] = size
        return clean


class RequestLimits:
    """The effective limit of each method: an operator's entry for the method, else for its service, else the
    larger of the built-in row and the default."""

    def __init__(self, settings: RequestLimitSettings | None = None):
        self.settings = settings or RequestLimitSettings()

    def for_method(self, method: str) -> int:
        name = method.lstrip("/")
        overrides = self.settings.method_max_request_bytes
        if name in overrides:
            return overrides[name]
        service = name.split("/", 1)[0]
        if service in overrides:
            return overrides[service]
        return max(BUILT_IN_LIMITS.get(name, 0), self.settings.max_request_bytes)

    def largest(self) -> int:
        return max(self.settings.max_request_bytes, *BUILT_IN_LIMITS.values(),
                   *self.settings.method_max_request_bytes.values())


def largest_request_bytes(settings: RequestLimitSettings | None = None) -> int:
    """The server-wide `grpc.max_receive_message_length`: the largest per-method limit and a small margin."""
    return RequestLimits(settings).largest() + _SERVER_MARGIN


def describe_size(size: int) -> str:
    return f"{size / MiB:g} MiB" if size % (64 * 1024) == 0 else f"{size} bytes"


@dataclass(frozen=True)
class RefusedRequest:
    """What the checking deserializer hands on instead of a message it would not or could not parse."""

    error: ServiceError


def oversize_error(method: str, size: int, limit: int) -> ResourceExhausted:
    return ResourceExhausted(
        f"{method} accepts request messages of at most {limit} bytes ({describe_size(limit)}); this one is"
        f" {size} bytes. An operator can raise the limit with RAGTUNE_GRPC_METHOD_MAX_REQUEST_BYTES"
        " (or RAGTUNE_GRPC_MAX_REQUEST_BYTES for every method)"
    )


def _checking_deserializer(method: str, deserializer, limit: int):
    message_type = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    type_name = message_type.full_name if message_type is not None else f"{method} request"

    def deserialize(raw: bytes) -> Any:
        if len(raw) > limit:
            return RefusedRequest(oversize_error(method, len(raw), limit))
        if deserializer is None:
            return raw
        try:
            return deserializer(raw)
        except DecodeError as exc:
            return RefusedRequest(InvalidArgument("request", f"is not a valid {type_name} message ({exc})"))

    return deserialize


class RequestLimitInterceptor(grpc.aio.ServerInterceptor):
    """Gives every handler a deserializer that measures the raw message against its method's limit before
    parsing, and refuses an oversize one with RESOURCE_EXHAUSTED (one that does not parse, INVALID_ARGUMENT).

    It sits just inside tracing and outside every other interceptor, so no other check (access, quotas,
    service-only fields) ever sees a `RefusedRequest`: a unary request is refused before the behaviour runs. In
    a request stream the refusal is raised where the servicer reads the message, so it cleans up as after any
    error (a half-written upload is removed before the client hears the answer)."""

    def __init__(self, settings: RequestLimitSettings | None = None):
        self.limits = RequestLimits(settings)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        deserialize = _checking_deserializer(method, handler.request_deserializer, self.limits.for_method(method))
        serialize = handler.response_serializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(_unary(handler.unary_unary, False), deserialize, serialize)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(_unary(handler.unary_stream, True), deserialize, serialize)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(_streamed(handler.stream_unary, False), deserialize, serialize)
        return grpc.stream_stream_rpc_method_handler(_streamed(handler.stream_stream, True), deserialize, serialize)


async def _refuse(context, error: ServiceError) -> None:
    status = error.to_status()
    await context.abort(status.code, status.details, status.trailing_metadata)


def _unary(behavior, streams_responses: bool):
    """A unary-request behaviour that answers a refused request instead of running."""

    async def refuse_or_pass(request, context):
        if isinstance(request, RefusedRequest):
            await _refuse(context, request.error)
        return request

    return _prepared(behavior, refuse_or_pass, streams_responses)


def _streamed(behavior, streams_responses: bool):
    """A stream-request behaviour whose request stream raises the error of a message the deserializer refused."""

    async def bounded(request_iterator, context):
        rpc_task = asyncio.current_task()

        async def messages() -> AsyncIterator:
            # Servicers iterate their request stream (none calls context.read(), which would bypass this).
            async for message in request_iterator:
                if isinstance(message, RefusedRequest):
                    if asyncio.current_task() is not rpc_task:
                        # Read by a downstream call the gateway forwards the stream to (Ingest, UploadDataset): that
                        # call swallows an error raised here (it only cancels itself), and the client would hear
                        # nothing until its deadline. So the refusal is answered from here first.
                        await _refuse(context, message.error)
                    raise message.error
                yield message

        return messages()

    return _prepared(behavior, bounded, streams_responses)


def _prepared(behavior, prepare, streams_responses: bool):
    """`behavior` with `prepare(request, context)` run first (it returns what the behaviour gets instead). A
    response stream is served as an async generator whatever the behaviour is: health's Watch is a coroutine that
    writes with context.write, and the tracing interceptor outside this one can only iterate a generator. A
    refusal that escapes the servicer on a method the error mapping does not cover (health, reflection) is
    answered here."""
    if streams_responses:
        async def streamed(request, context):
            try:
                result = behavior(await prepare(request, context), context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                else:
                    await result  # it writes its responses itself
            except ServiceError as error:
                await _refuse(context, error)

        return streamed

    async def awaited(request, context):
        try:
            result = behavior(await prepare(request, context), context)
            return await result if inspect.isawaitable(result) else result
        except ServiceError as error:
            await _refuse(context, error)

    return awaited
