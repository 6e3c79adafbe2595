"""POST /v1/embeddings: texts -> the retriever's embedding model (its Embed RPC)."""

from __future__ import annotations

import base64
import struct

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.http.context import FrontState, check_fields, json_body, number, string
from ragtune.errors import InvalidArgument
from ragtune.v1 import retriever_pb2

KNOWN = {"input", "model", "encoding_format", "dimensions", "user"}


async def embeddings(request: Request) -> Response:
    state: FrontState = request.app.state.front
    budget = state.authorize(request)
    body = await json_body(request)
    check_fields(body, KNOWN)
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise InvalidArgument("input", "must be a non-empty string or a list of them (token arrays are not accepted)")
    encoding = string(body, "encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise InvalidArgument("encoding_format", "must be 'float' or 'base64'")
    dimensions = number(body, "dimensions", int, 1, 1 << 16)
    down = state.downstream
    reply = await down.retriever.embed(retriever_pb2.EmbedRequest(texts=texts), budget)
    model = string(body, "model")
    if model and not (reply.model.endswith(model) or model.endswith(reply.model)):
        raise InvalidArgument("model", f"the only embedding model here is '{reply.model}'")
    data = []
    for i, e in enumerate(reply.embeddings):
        vector = list(e.vector)
        if dimensions is not None and dimensions != len(vector):
            raise InvalidArgument("dimensions", f"'{reply.model}' embeds in {len(vector)} dimensions only")
        value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode() if encoding == "base64" else vector
        data.append({"object": "embedding", "index": i, "embedding": value})
    return JSONResponse({"object": "list", "data": data, "model": reply.model,
                         "usage": {"prompt_tokens": reply.total_tokens, "total_tokens": reply.total_tokens}})
