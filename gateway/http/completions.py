"""POST /v1/completions: a raw prompt -> the generator's Generate / GenerateStream (base model or adapter)."""

from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.http.context import FrontState, check_fields, flag, json_body
from gateway.http.sampling import FINISH, SAMPLING_FIELDS, completion_logprobs, sampling_params, usage
from gateway.http.sse import event, stream_response
from ragtune.errors import InvalidArgument
from ragtune.v1 import generator_pb2

KNOWN = SAMPLING_FIELDS | {"model", "prompt", "stream", "stream_options", "user", "echo", "best_of", "suffix",
                           "response_format"}
UNSUPPORTED = {"logit_bias": "is not supported by this server"}


def _prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise InvalidArgument("prompt", "must be a non-empty string (one prompt per request)")
    return prompt


def _check_unsupported(body: dict[str, Any]) -> None:
    if body.get("echo"):
        raise InvalidArgument("echo", "is not supported by this server")
    if body.get("suffix"):
        raise InvalidArgument("suffix", "is not supported by this server")
    if body.get("best_of") not in (None, 1) and body.get("best_of") != body.get("n"):
        raise InvalidArgument("best_of", "is not supported by this server (use n)")


async def completions(request: Request) -> Response:
    state: FrontState = request.app.state.front
    budget = state.authorize(request)
    body = await json_body(request)
    check_fields(body, KNOWN, UNSUPPORTED)
    _check_unsupported(body)
    prompt = _prompt(body)
    sampling = sampling_params(body, chat=False)
    adapter = await state.adapter_of(body.get("model"), budget)
    ident, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), body["model"]
    down = state.downstream
    gen_input = generator_pb2.GenerationInput(prompt=prompt)
    if flag(body, "stream"):
        options = body.get("stream_options") or {}
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        request_ = generator_pb2.GenerateStreamRequest(input=gen_input, sampling=sampling, adapter=adapter)
        parts = down.generator.generate_stream(request_, budget)
        first = await anext(parts, None)  # a bad request fails here, with its HTTP status
        return stream_response(_chunks(first, parts, ident, created, model, include_usage))
    reply = await down.generator.generate(generator_pb2.GenerateRequest(input=gen_input, sampling=sampling, adapter=adapter), budget)
    choices = reply.choices or [generator_pb2.GenerationChoice(text=reply.text, finish_reason=reply.finish_reason)]
    return JSONResponse({
        "id": ident, "object": "text_completion", "created": created, "model": reply.adapter or model,
        "system_fingerprint": None,
        "choices": [{"index": c.index, "text": c.text, "logprobs": completion_logprobs(c.logprobs),
                     "finish_reason": FINISH.get(c.finish_reason, "stop")} for c in choices],
        "usage": usage(reply.usage),
    })


async def _chunks(first, parts, ident: str, created: int, model: str, include_usage: bool) -> AsyncIterator[bytes]:
    def chunk(choices: list, **extra) -> bytes:
        return event({"id": ident, "object": "text_completion", "created": created, "model": model,
                      "system_fingerprint": None, "choices": choices, **extra})

    offsets: dict[int, int] = {}
    part = first
    try:
        while part is not None:
            if part.delta or part.finish_reason:
                at = offsets.get(part.index, 0)
                offsets[part.index] = at + len(part.delta)
                yield chunk([{"index": part.index, "text": part.delta,
                              "logprobs": completion_logprobs(part.logprobs, at),
                              "finish_reason": FINISH.get(part.finish_reason) if part.finish_reason else None}])
            if part.HasField("usage") and include_usage:
                yield chunk([], usage=usage(part.usage))
            part = await anext(parts, None)
    finally:
        await parts.aclose()
