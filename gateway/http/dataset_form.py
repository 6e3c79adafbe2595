"""The multipart body of POST /v1/files, parsed as it arrives: the dataset goes straight to a temporary file
while its SHA-256 is computed, so an upload is never held whole in memory and is refused the moment it passes
its limit. The temporary file is removed whatever happens (`discard`)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from gateway.http.limits import RequestTooLarge
from ragtune.errors import InvalidArgument

_FIELDS = ("file", "purpose")
_MAX_PURPOSE_BYTES = 64  # "fine-tune"
_MAX_PART_HEADER_BYTES = 16 * 1024  # a part's headers are kept in memory until they end: bound them


class DatasetForm:
    """Feed it the body's chunks, then `finish()`: `purpose`, `filename`, `size`, `sha256` and `path` (the
    spooled dataset) describe what arrived. `max_file_bytes` bounds the dataset; `folder` holds the spool."""

    def __init__(self, boundary: bytes, max_file_bytes: int, folder: Path | None = None):
        self.purpose: str | None = None
        self.filename = ""
        self.size = 0
        self.path: Path | None = None
        self._max_file_bytes = max_file_bytes
        self._folder = folder
        self._digest = hashlib.sha256()
        self._file = None
        self._file_complete = False
        self._part: str | None = None
        self._purpose = b""
        self._header_name = b""
        self._header_value = b""
        self._header_bytes = 0
        self._headers: dict[bytes, bytes] = {}
        self._parser = MultipartParser(boundary, callbacks={
            "on_part_begin": self._on_part_begin, "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value, "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished, "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
        })

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def feed(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise InvalidArgument("file", f"the multipart body is malformed ({exc})") from None

    def finish(self) -> None:
        """Checks the form is complete: a `file` part that ended, and `purpose`."""
        try:
            self._parser.finalize()
        except MultipartParseError as exc:
            raise InvalidArgument("file", f"the multipart body is malformed ({exc})") from None
        if self._file is not None:
            self._file.close()
        if not self._file_complete:
            raise InvalidArgument("file", "is required: the JSONL dataset, as a complete file part")
        self._check_purpose(self.purpose)

    def discard(self) -> None:
        """Removes the spooled dataset (after it was passed on, or when the upload failed)."""
        if self._file is not None:
            self._file.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    # ---- python-multipart callbacks (synchronous, called from feed) ------------------------------------------
    def _on_part_begin(self) -> None:
        self._part, self._headers, self._header_bytes = None, {}, 0

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name, self._header_value = b"", b""

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name not in _FIELDS:
            raise InvalidArgument(name or "file", "unrecognized form field: send only 'file' and 'purpose'")
        if name == "file":
            if self._file is not None:
                raise InvalidArgument("file", "send one file per upload")
            self.filename = options.get(b"filename", b"").decode("utf-8", "replace")
            if self._folder is not None:
                self._folder.mkdir(parents=True, exist_ok=True)
            handle, path = tempfile.mkstemp(dir=self._folder, prefix="ragtune-upload-", suffix=".jsonl")
            self.path = Path(path)
            self._file = os.fdopen(handle, "wb")
        elif self.purpose is not None:
            raise InvalidArgument("purpose", "send it once")
        self._part = name

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._part == "purpose":
            self._purpose += chunk
            if len(self._purpose) > _MAX_PURPOSE_BYTES:
                raise InvalidArgument("purpose", "must be 'fine-tune'")
            return
        self.size += len(chunk)
        if self.size > self._max_file_bytes:
            raise RequestTooLarge("file: the dataset", self._max_file_bytes, "RAGTUNE_GATEWAY_HTTP_MAX_UPLOAD_BYTES")
        # A write of one received chunk (tens of KiB) lands in the page cache: too short to hand to a thread.
        self._file.write(chunk)
        self._digest.update(chunk)

    def _on_part_end(self) -> None:
        if self._part == "purpose":
            self.purpose = self._purpose.decode("utf-8", "replace")
            self._check_purpose(self.purpose)  # refuse before the file is read when purpose comes first
        elif self._part == "file":
            self._file_complete = True

    def _count_header(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > _MAX_PART_HEADER_BYTES:
            raise InvalidArgument("file", f"a part's headers exceed {_MAX_PART_HEADER_BYTES} bytes")

    @staticmethod
    def _check_purpose(purpose: str | None) -> None:
        if purpose != "fine-tune":
            raise InvalidArgument("purpose", "must be 'fine-tune' (the only files this server keeps are datasets)")
