"""Per-route caps on HTTP request bodies, enforced before a route reads or parses its body.

A plain ASGI middleware: a declared Content-Length over the route's cap is answered 413 at once, without
reading a byte of the body; a chunked body is counted as it arrives and refused the moment it passes the cap.
The 413 is OpenAI's error JSON naming the cap and the setting that raises it, and closes the connection, so a
client cannot go on sending the rest of a refused body.
"""

from __future__ import annotations

from pathlib import Path

import grpc
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.http.errors import HttpError, error_response

MiB = 1 << 20

# Room in a POST /v1/files body for the multipart envelope around the dataset (boundaries, part headers, purpose).
UPLOAD_ENVELOPE_BYTES = MiB

_INFERENCE_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
_UPLOAD_ROUTES = frozenset({"/v1/files"})

# Where the middleware leaves its settings in the ASGI scope, for the upload route to read its limits from.
SCOPE_KEY = "ragtune.http_limits"


class HttpLimitSettings(BaseSettings):
    """Body caps of the OpenAI-compatible front (environment RAGTUNE_GATEWAY_HTTP_*)."""

    model_config = SettingsConfigDict(env_prefix="RAGTUNE_GATEWAY_HTTP_", extra="ignore", frozen=True)

    max_body_bytes: int = Field(
        MiB, ge=1, description="Largest request body, in bytes, of a route without a cap of its own (fine-tuning"
        " jobs, models, everything else)."
    )
    max_inference_body_bytes: int = Field(
        4 * MiB, ge=1, description="Largest body of POST /v1/chat/completions, /v1/completions and /v1/embeddings:"
        " the gRPC front's limit on Chat and Embed (RAGTUNE_GRPC_*)."
    )
    max_upload_bytes: int = Field(
        64 * MiB, ge=1, description="Largest dataset POST /v1/files accepts, in bytes (its body may be 1 MiB more,"
        " for the multipart envelope). Keep it at most the trainer's RAGTUNE_TRAINER_MAX_DATASET_BYTES."
    )
    upload_dir: Path | None = Field(
        None, description="Folder where POST /v1/files spools a dataset while it arrives (removed once passed on"
        " to the trainer, or refused); default the system's temporary folder."
    )

    def body_cap(self, path: str) -> tuple[int, str]:
        """The largest body the route at `path` accepts, and the setting that raises it."""
        if path in _UPLOAD_ROUTES:
            return self.max_upload_bytes + UPLOAD_ENVELOPE_BYTES, "RAGTUNE_GATEWAY_HTTP_MAX_UPLOAD_BYTES"
        if path in _INFERENCE_ROUTES:
            return self.max_inference_body_bytes, "RAGTUNE_GATEWAY_HTTP_MAX_INFERENCE_BODY_BYTES"
        return self.max_body_bytes, "RAGTUNE_GATEWAY_HTTP_MAX_BODY_BYTES"


def describe_size(size: int) -> str:
    return f"{size} bytes ({size / MiB:g} MiB)" if size % (64 * 1024) == 0 else f"{size} bytes"


class RequestTooLarge(HttpError):
    """A body (or the dataset in it) over its cap: 413, naming the cap and its setting."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, what: str, cap: int, setting: str):
        super().__init__(413, f"{what} is larger than the {describe_size(cap)} this server accepts (raise it with"
                              f" {setting})", "invalid_request_error", "request_too_large")


def limits_of(scope) -> HttpLimitSettings:
    """The caps the middleware serves with (the environment's when the app runs without it)."""
    return scope.get(SCOPE_KEY) or HttpLimitSettings()


class BodyLimitMiddleware:
    """Caps each request body by its route (see `HttpLimitSettings.body_cap`)."""

    def __init__(self, app, settings: HttpLimitSettings | None = None):
        self.app = app
        self.settings = settings or HttpLimitSettings()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope[SCOPE_KEY] = self.settings
        cap, setting = self.settings.body_cap(scope["path"])
        what = f"the body of {scope['method']} {scope['path']}"
        declared = _content_length(scope)
        if declared is not None and declared > cap:
            return await _refuse(send, RequestTooLarge(what, cap, setting))
        received = 0
        refused: RequestTooLarge | None = None
        started = False

        async def counted_receive():
            nonlocal received, refused
            if refused is not None:  # whoever catches the first refusal must not read on
                raise refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    refused = RequestTooLarge(what, cap, setting)
                    raise refused
            return message

        async def closing_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                # The rest of a refused body (here, or the dataset in it by the upload route) is never read: end
                # the connection with the answer, or the server would go on receiving it to discard it.
                if refused is not None or message["status"] == 413:
                    message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, counted_receive, closing_send)
        except RequestTooLarge as exc:  # raised where no route turned it into its answer
            if started:
                raise
            await _refuse(send, exc)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP server refuses a malformed length itself
    return None


async def _refuse(send, error: RequestTooLarge) -> None:
    response = error_response(error)
    response.headers["connection"] = "close"
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})
