"""Server-sent events as OpenAI streams them: `data: <json>` events, then `data: [DONE]`; an error after
the stream started is one `data: {"error": ...}` event (the status line has been sent already)."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

from starlette.responses import StreamingResponse

from gateway.http.errors import describe

DONE = b"data: [DONE]\n\n"


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def error_event(exc: BaseException) -> bytes:
    """An error once the stream started: one event in OpenAI's error shape."""
    _, body, _ = describe(exc)
    return event(body)


def stream_response(events: AsyncIterator[bytes]) -> StreamingResponse:
    async def guarded() -> AsyncIterator[bytes]:
        try:
            async for chunk in events:
                yield chunk
        except Exception as exc:  # noqa: BLE001 - the client gets OpenAI's error shape, not a cut stream
            yield error_event(exc)
            return
        yield DONE

    return StreamingResponse(guarded(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
