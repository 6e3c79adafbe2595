"""POST /v1/files: a fine-tuning dataset (multipart, purpose "fine-tune") -> the trainer's UploadDataset.
The file id is the dataset's name in the trainer, "file-" and the start of its SHA-256 (the same bytes
give the same id), so it is what /v1/fine_tuning/jobs takes as training_file."""

from __future__ import annotations

import hashlib
import time
from typing import AsyncIterator

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.auth import Scope
from gateway.http.context import FrontState
from ragtune.errors import InvalidArgument
from ragtune.v1 import trainer_pb2

_CHUNK = 1 << 20


async def upload_file(request: Request) -> Response:
    state: FrontState = request.app.state.front
    budget = state.authorize(request, Scope.TRAIN)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidArgument("file", "send the dataset as multipart/form-data with fields 'file' and 'purpose'")
    async with request.form() as form:
        purpose, upload = form.get("purpose"), form.get("file")
        if purpose != "fine-tune":
            raise InvalidArgument("purpose", "must be 'fine-tune' (the only files this server keeps are datasets)")
        if not isinstance(upload, UploadFile):
            raise InvalidArgument("file", "is required: the JSONL dataset, as a file part")
        digest = hashlib.sha256()
        while chunk := await upload.read(_CHUNK):
            digest.update(chunk)
        await upload.seek(0)
        file_id = f"file-{digest.hexdigest()[:24]}"

        async def messages() -> AsyncIterator[trainer_pb2.UploadDatasetRequest]:
            yield trainer_pb2.UploadDatasetRequest(name=file_id)
            while chunk := await upload.read(_CHUNK):
                yield trainer_pb2.UploadDatasetRequest(content=chunk)

        down = state.downstream
        reply = await down.trainer.upload_dataset(messages(), budget)
        return JSONResponse({"id": reply.name, "object": "file", "bytes": reply.size_bytes,
                             "created_at": int(time.time()), "filename": upload.filename or reply.name,
                             "purpose": "fine-tune", "status": "processed", "status_details": None,
                             "expires_at": None})
