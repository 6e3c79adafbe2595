"""POST /v1/chat/completions: OpenAI chat -> the gateway's chat pipeline (plain, or RAG with the
`ragtune` extension field), answered as one JSON object or streamed as server-sent events."""

from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator

from google.protobuf import json_format
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.http.context import FrontState, check_fields, flag, json_body, number, string
from gateway.http.sampling import FINISH, SAMPLING_FIELDS, chat_logprobs, sampling_params, usage
from gateway.http.sse import event, stream_response
from ragtune.errors import InvalidArgument
from ragtune.v1 import common_pb2, gateway_pb2, retriever_pb2

KNOWN = SAMPLING_FIELDS | {"model", "messages", "stream", "stream_options", "max_completion_tokens", "top_logprobs",
                           "response_format", "user", "metadata", "store", "ragtune", "service_tier",
                           "parallel_tool_calls"}
UNSUPPORTED = {name: "is not supported by this server" for name in (
    "tools", "tool_choice", "functions", "function_call", "logit_bias", "audio", "modalities", "prediction",
    "web_search_options", "reasoning_effort")}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_MODES = {"vector": retriever_pb2.SEARCH_MODE_VECTOR, "keyword": retriever_pb2.SEARCH_MODE_KEYWORD,
          "hybrid": retriever_pb2.SEARCH_MODE_HYBRID}
_RAG_FIELDS = {"collection", "top_k", "alpha", "mode", "filter", "no_rewrite"}


def _messages(body: dict[str, Any]) -> list[common_pb2.ChatMessage]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument("messages", "must be a non-empty list of {role, content} messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidArgument(f"messages[{i}]", "must be an object with role and content")
        role = _ROLES.get(m.get("role"))
        if role is None:
            raise InvalidArgument(f"messages[{i}].role", "must be 'system', 'developer', 'user' or 'assistant'")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise InvalidArgument(f"messages[{i}].content", "only text parts ({type: text, text}) are supported")
            content = "".join(p["text"] for p in content)
        elif content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise InvalidArgument(f"messages[{i}].content", "must be a string or a list of text parts")
        out.append(common_pb2.ChatMessage(role=role, content=content))
    return out


def _retrieval(ext: Any) -> gateway_pb2.ChatRetrieval | None:
    if ext is None:
        return None
    if not isinstance(ext, dict):
        raise InvalidArgument("ragtune", "must be an object: {collection, top_k, alpha, mode, filter, no_rewrite}")
    unknown = sorted(set(ext) - _RAG_FIELDS)
    if unknown:
        raise InvalidArgument(f"ragtune.{unknown[0]}", f"unrecognized; known: {sorted(_RAG_FIELDS)}")
    r = gateway_pb2.ChatRetrieval(collection=string(ext, "collection", required=True))
    top_k = number(ext, "top_k", int, 1, 100)
    if top_k is not None:
        r.top_k = top_k
    alpha = number(ext, "alpha", float, 0, 1)
    if alpha is not None:
        r.alpha = alpha
    if ext.get("mode") is not None:
        if ext["mode"] not in _MODES:
            raise InvalidArgument("ragtune.mode", f"must be one of {sorted(_MODES)}")
        r.mode = _MODES[ext["mode"]]
    if ext.get("filter") is not None:
        try:
            json_format.ParseDict(ext["filter"], r.filter)
        except (json_format.ParseError, TypeError, AttributeError) as exc:
            raise InvalidArgument("ragtune.filter", f"is not a valid filter: {exc}") from None
    r.no_rewrite = flag(ext, "no_rewrite")
    return r


def citation(c: gateway_pb2.Citation) -> dict[str, Any]:
    return {"number": c.number, "chunk_id": c.chunk_id, "document_id": c.document_id, "chunk_index": c.chunk_index,
            "score": c.score, "text": c.text, "inferred": c.inferred}


async def conversation(state: FrontState, body: dict[str, Any], budget) -> gateway_pb2.ChatConversation:
    check_fields(body, KNOWN, UNSUPPORTED)
    c = gateway_pb2.ChatConversation(messages=_messages(body), sampling=sampling_params(body, chat=True))
    c.adapter = await state.adapter_of(body.get("model"), budget)
    retrieval = _retrieval(body.get("ragtune"))
    if retrieval is not None:
        c.retrieval.CopyFrom(retrieval)
    return c


async def chat_completions(request: Request) -> Response:
    state: FrontState = request.app.state.front
    budget = state.authorize(request)
    body = await json_body(request)
    c = await conversation(state, body, budget)
    ident, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body["model"]
    if flag(body, "stream"):
        options = body.get("stream_options") or {}
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        events = state.chat.stream(c, budget)
        first = await anext(events, None)  # a bad request fails here, with its HTTP status, before any byte is sent
        return stream_response(_chunks(first, events, ident, created, model, include_usage))
    reply = await state.chat.chat(c, budget)
    out = {
        "id": ident, "object": "chat.completion", "created": created, "model": reply.adapter or model,
        "system_fingerprint": None,
        "choices": [_choice(ch, c.HasField("retrieval")) for ch in reply.choices],
        "usage": usage(reply.usage),
    }
    if c.HasField("retrieval"):
        out["ragtune"] = {"search_query": reply.search_query, "context": [citation(x) for x in reply.context],
                          "citations": [citation(x) for x in reply.choices[0].citations] if reply.choices else []}
    return JSONResponse(out)


def _choice(ch: gateway_pb2.ChatChoice, rag: bool) -> dict[str, Any]:
    choice = {"index": ch.index, "message": {"role": "assistant", "content": ch.content, "refusal": None},
              "logprobs": chat_logprobs(ch.logprobs), "finish_reason": FINISH.get(ch.finish_reason, "stop")}
    if rag:
        choice["ragtune"] = {"citations": [citation(x) for x in ch.citations]}
    return choice


async def _chunks(first, events, ident: str, created: int, model: str, include_usage: bool) -> AsyncIterator[bytes]:
    def chunk(choices: list, **extra) -> bytes:
        return event({"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                      "system_fingerprint": None, "choices": choices, **extra})

    started: set[int] = set()
    e = first
    try:
        while e is not None:
            kind = e.WhichOneof("event")
            if kind == "context":
                yield chunk([], ragtune={"search_query": e.context.search_query,
                                         "context": [citation(x) for x in e.context.context]})
            elif kind == "delta":
                d = e.delta
                delta = {"content": d.content}
                if d.index not in started:
                    started.add(d.index)
                    delta["role"] = "assistant"
                yield chunk([{"index": d.index, "delta": delta, "logprobs": chat_logprobs(d.logprobs),
                              "finish_reason": None}])
            elif kind == "done":
                for ch in e.done.choices:
                    delta = {} if ch.index in started else {"role": "assistant", "content": ""}
                    choice = {"index": ch.index, "delta": delta, "logprobs": None,
                              "finish_reason": FINISH.get(ch.finish_reason, "stop")}
                    if ch.citations:
                        choice["ragtune"] = {"citations": [citation(x) for x in ch.citations]}
                    yield chunk([choice])
                if include_usage:
                    yield chunk([], usage=usage(e.done.usage))
            e = await anext(events, None)
    finally:
        await events.aclose()  # a client that left cancels the generation downstream
