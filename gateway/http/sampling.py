"""OpenAI sampling fields -> ragtune SamplingParams (common.proto), and generator results -> OpenAI's
finish reasons and logprobs. Ranges the generator checks itself (it names the field) are not re-checked."""

from __future__ import annotations

import json
from typing import Any

from ragtune.errors import InvalidArgument
from ragtune.v1 import common_pb2
from gateway.http.context import flag, number

# Fields both /v1/chat/completions and /v1/completions take.
SAMPLING_FIELDS = {"temperature", "top_p", "top_k", "max_tokens", "stop", "seed", "n", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "logprobs"}

FINISH = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length",
          common_pb2.FINISH_REASON_ABORT: "stop"}


def sampling_params(body: dict[str, Any], *, chat: bool) -> common_pb2.SamplingParams:
    p = common_pb2.SamplingParams()
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        value = number(body, name)
        if value is not None:
            setattr(p, name, value)
    top_k = number(body, "top_k", int, -1, 1 << 20)
    if top_k is not None and top_k > 0:
        p.top_k = top_k
    max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = number(body, max_name, int, 1, 1 << 20)
    if max_tokens is not None:
        p.max_tokens = max_tokens
    seed = number(body, "seed", int, -(1 << 63), (1 << 63) - 1)
    if seed is not None:
        p.seed = seed
    n = number(body, "n", int, 1, 128)
    if n is not None:
        p.n = n
    p.stop.extend(_stop(body.get("stop")))
    if chat:
        p.logprobs = flag(body, "logprobs")
        top = number(body, "top_logprobs", int, 0, 20)
        if top is not None:
            if not p.logprobs:
                raise InvalidArgument("top_logprobs", "needs logprobs set to true")
            p.top_logprobs = top
    else:  # /v1/completions: logprobs is the number of most likely tokens to return at each position
        top = number(body, "logprobs", int, 0, 5)
        if top is not None:
            p.logprobs = True
            p.top_logprobs = top
    structured = _structured(body.get("response_format"))
    if structured is not None:
        p.structured_output.CopyFrom(structured)
    return p


def _stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise InvalidArgument("stop", "must be a non-empty string or a list of up to 4 of them")
    return stop


def _structured(fmt: Any) -> common_pb2.StructuredOutput | None:
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return common_pb2.StructuredOutput(json_object=True)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidArgument("response_format.json_schema.schema", "must be a JSON schema object")
        return common_pb2.StructuredOutput(json_schema=json.dumps(schema))
    raise InvalidArgument("response_format", "type must be 'text', 'json_object' or 'json_schema'")


def chat_logprobs(logprobs) -> dict[str, Any] | None:
    """TokenLogprob messages -> a chat choice's {"content": [...]} (None when none were asked for)."""
    if not logprobs:
        return None
    return {"content": [_token(t, top=[_token(x) for x in t.top_logprobs]) for t in logprobs], "refusal": None}


def _token(t, top: list | None = None) -> dict[str, Any]:
    entry = {"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode())}
    if top is not None:
        entry["top_logprobs"] = top
    return entry


def completion_logprobs(logprobs, offset: int = 0) -> dict[str, Any] | None:
    """TokenLogprob messages -> a legacy completion choice's logprobs object."""
    if not logprobs:
        return None
    offsets, at = [], offset
    for t in logprobs:
        offsets.append(at)
        at += len(t.token)
    return {
        "tokens": [t.token for t in logprobs],
        "token_logprobs": [t.logprob for t in logprobs],
        "top_logprobs": [{x.token: x.logprob for x in t.top_logprobs} for t in logprobs],
        "text_offset": offsets,
    }


def usage(u) -> dict[str, int]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens}
