"""One Ingest stream: batches documents across messages and embeds the next batch while the last is written.

Batches hold whole messages, are committed in stream order, each all or nothing, so after every commit the
stream is durable up to a message boundary (`committed_messages`). A document sent again later in the
stream replaces the earlier version (the later one wins, as across separate upserts); one already stored
with the same content hash, e.g. by an earlier try of the same stream, is skipped and counted `unchanged`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from services.retriever.core import Prepared, Retriever, UpsertCounts, content_hash
from services.retriever.domain import CollectionSpec, DocumentInput


@dataclass
class IngestCounts(UpsertCounts):
    committed_messages: int = 0  # messages 0..n-1 are stored whole

    @property
    def committed(self) -> int:
        """Documents of this stream now stored as sent (written or already there)."""
        return self.upserted + self.unchanged


class IngestSession:
    def __init__(self, retriever: Retriever, tenant: str, spec: CollectionSpec, *, batch_documents: int,
                 batch_bytes: int):
        self._retriever, self._tenant, self.spec = retriever, tenant, spec
        self._batch_documents, self._batch_bytes = batch_documents, batch_bytes
        self._buffer: dict[str, DocumentInput] = {}
        self._buffer_bytes = 0
        self._last_message = -1
        self._writing: asyncio.Task | None = None
        self._in_flight: dict[str, str] = {}  # id -> content hash of documents being written now
        self.counts = IngestCounts()

    async def add(self, message_index: int, docs: list[DocumentInput]) -> None:
        """Buffers one validated message; cuts a batch once the buffer is full (only between messages)."""
        for doc in docs:
            self._buffer.pop(doc.id, None)  # re-inserted at the end: the later version wins
            self._buffer[doc.id] = doc
            self._buffer_bytes += len(doc.text)
        self._last_message = message_index
        if len(self._buffer) >= self._batch_documents or self._buffer_bytes >= self._batch_bytes:
            await self._cut()

    async def finish(self) -> IngestCounts:
        """Commits everything buffered and waits for the last write; returns the stream's totals."""
        await self._cut()
        await self._wait_write()
        return self.counts

    async def close(self) -> None:
        """Lets a write already started finish (it cannot be half-done) without raising its error again."""
        if self._writing is not None:
            await asyncio.gather(self._writing, return_exceptions=True)

    async def _cut(self) -> None:
        if not self._buffer:
            return
        batch, through = list(self._buffer.values()), self._last_message + 1
        self._buffer, self._buffer_bytes = {}, 0
        # Embedding this batch overlaps the write of the previous one; the hashes being written count as
        # stored, so a document repeated in consecutive batches is compared with its newest version.
        prepared = await self._retriever.prepare(self._tenant, self.spec, batch, known=dict(self._in_flight))
        await self._wait_write()
        self._in_flight = {d.id: content_hash(d, self.spec) for d in batch}
        self._writing = asyncio.create_task(self._write(prepared, through))

    async def _write(self, prepared: Prepared, through: int) -> None:
        self.counts.add(await self._retriever.write(self._tenant, self.spec, prepared))
        self.counts.committed_messages = through

    async def _wait_write(self) -> None:
        if self._writing is not None:
            task, self._writing = self._writing, None
            await task
