"""POST /v1/files: a fine-tuning dataset (multipart, purpose "fine-tune") -> the trainer's UploadDataset.
The file id is the dataset's name in the trainer, "file-" and the start of its SHA-256 (the same bytes
give the same id), so it is what /v1/fine_tuning/jobs takes as training_file.

The id is known only once the last byte has arrived, and it must open the UploadDataset stream: the body is
spooled to a temporary file as it arrives (gateway/http/dataset_form.py, bounded by
RAGTUNE_GATEWAY_HTTP_MAX_UPLOAD_BYTES), then streamed to the trainer from it and removed."""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

from python_multipart.multipart import parse_options_header
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.http.context import FrontState
from gateway.http.dataset_form import DatasetForm
from gateway.http.limits import limits_of
from ragtune.errors import InvalidArgument
from ragtune.v1 import trainer_pb2

_CHUNK = 1 << 20  # one UploadDataset message (the trainer takes up to 2 MiB a message)


async def upload_file(request: Request) -> Response:
    state: FrontState = request.app.state.front
    budget = state.authorize(request)
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or not options.get(b"boundary"):
        raise InvalidArgument("file", "send the dataset as multipart/form-data with fields 'file' and 'purpose'")
    limits = limits_of(request.scope)
    form = DatasetForm(options[b"boundary"], limits.max_upload_bytes, limits.upload_dir)
    try:
        async for chunk in request.stream():
            form.feed(chunk)
        form.finish()
        file_id = f"file-{form.sha256[:24]}"

        async def messages() -> AsyncIterator[trainer_pb2.UploadDatasetRequest]:
            yield trainer_pb2.UploadDatasetRequest(name=file_id)
            with open(form.path, "rb") as spooled:
                while chunk := await asyncio.to_thread(spooled.read, _CHUNK):
                    yield trainer_pb2.UploadDatasetRequest(content=chunk)

        reply = await state.downstream.trainer.upload_dataset(messages(), budget)
    finally:
        form.discard()
    return JSONResponse({"id": reply.name, "object": "file", "bytes": reply.size_bytes,
                         "created_at": int(time.time()), "filename": form.filename or reply.name,
                         "purpose": "fine-tune", "status": "processed", "status_details": None,
                         "expires_at": None})
