"""The retriever's logic without gRPC: collections, idempotent all-or-nothing upserts, and search."""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass

from ragtune.errors import InvalidArgument
from services.retriever.backends.base import VectorStore
from services.retriever.chunking import Chunker
from services.retriever.domain import (
    Chunk,
    CollectionSpec,
    DocumentInput,
    Hit,
    PreparedDocument,
    SearchMode,
    SearchQuery,
)
from services.retriever.embedding import Embedder
from services.retriever.validation import collection_name


@dataclass
class UpsertCounts:
    upserted: int = 0
    unchanged: int = 0
    chunks: int = 0

    def add(self, other: "UpsertCounts") -> None:
        self.upserted += other.upserted
        self.unchanged += other.unchanged
        self.chunks += other.chunks


def content_hash(doc: DocumentInput, spec: CollectionSpec) -> str:
    """Changes whenever what would be stored changes: text, metadata or the collection's chunking."""
    payload = json.dumps(
        {"text": doc.text, "metadata": doc.metadata, "chunking": [spec.chunk_tokens, spec.overlap_tokens]},
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class Retriever:
    """Runs every blocking step (store, tokenizer, model) in a worker thread so the event loop keeps serving."""

    def __init__(self, store: VectorStore, embedder: Embedder):
        self.store = store
        self.embedder = embedder
        self.chunker = Chunker(embedder.tokenizer)

    # ---- collections --------------------------------------------------------------------------
    async def create_collection(self, tenant: str, spec: CollectionSpec) -> CollectionSpec:
        return await asyncio.to_thread(self.store.create_collection, tenant, spec)

    async def collection(self, tenant: str, name: str, field: str = "name") -> CollectionSpec:
        """The tenant's collection; INVALID_ARGUMENT for a malformed name, NOT_FOUND if it has none."""
        collection_name(name, field)
        return await asyncio.to_thread(self.store.get_collection, tenant, name)

    async def list_collections(self, tenant: str) -> list[CollectionSpec]:
        return await asyncio.to_thread(self.store.list_collections, tenant)

    async def delete_collection(self, tenant: str, name: str) -> None:
        collection_name(name, "name")
        await asyncio.to_thread(self.store.delete_collection, tenant, name)

    async def stats(self, tenant: str, spec: CollectionSpec) -> tuple[int, int]:
        return await asyncio.to_thread(self.store.stats, tenant, spec)

    # ---- documents ----------------------------------------------------------------------------
    def _prepare(self, spec: CollectionSpec, docs: list[DocumentInput], hashes: dict[str, str]) -> list[PreparedDocument]:
        split = [self.chunker.split(d.text, spec.chunk_tokens, spec.overlap_tokens) for d in docs]
        texts = [c.text for chunks in split for c in chunks]
        vectors = self.embedder.embed(texts)
        prepared, row = [], 0
        for doc, chunks in zip(docs, split):
            stored = []
            for c in chunks:
                stored.append(Chunk(doc.id, c.index, c.text, vectors[row].tolist(), doc.metadata, hashes[doc.id]))
                row += 1
            prepared.append(PreparedDocument(doc.id, hashes[doc.id], stored))
        return prepared

    async def upsert(self, tenant: str, spec: CollectionSpec, docs: list[DocumentInput]) -> UpsertCounts:
        """Writes the changed documents of a validated batch in one all-or-nothing store call."""
        hashes = {d.id: content_hash(d, spec) for d in docs}
        stored = await asyncio.to_thread(self.store.content_hashes, tenant, spec, list(hashes))
        changed = [d for d in docs if stored.get(d.id) != hashes[d.id]]
        counts = UpsertCounts(unchanged=len(docs) - len(changed))
        if not changed:
            return counts
        prepared = await asyncio.to_thread(self._prepare, spec, changed, hashes)
        await asyncio.to_thread(self.store.replace_documents, tenant, spec, prepared)
        counts.upserted = len(prepared)
        counts.chunks = sum(len(p.chunks) for p in prepared)
        return counts

    async def delete_documents(self, tenant: str, spec: CollectionSpec, ids: list[str]) -> tuple[int, list[str]]:
        deleted = set(await asyncio.to_thread(self.store.delete_documents, tenant, spec, ids))
        return len(deleted), [d for d in ids if d not in deleted]

    # ---- search -------------------------------------------------------------------------------
    async def search(self, tenant: str, spec: CollectionSpec, query: SearchQuery) -> list[Hit]:
        # Hybrid always sends a vector: Weaviate would otherwise try to vectorize the query itself.
        needs_vector = query.mode in (SearchMode.VECTOR, SearchMode.HYBRID)
        vector = None
        if needs_vector:
            vector = (await asyncio.to_thread(self.embedder.embed, [query.text]))[0].tolist()
        return await asyncio.to_thread(
            lambda: self.store.search(
                tenant,
                spec,
                mode=query.mode.value,
                text=query.text,
                vector=vector,
                top_k=query.top_k,
                alpha=query.alpha,
                filter=query.filter,
            )
        )


class IngestSession:
    """Collects streamed documents and commits them in batches of up to `batch_size`, each all or nothing.

    A document id seen again before its batch is committed flushes the batch first, so the later
    version wins as it would across separate upserts."""

    def __init__(self, retriever: Retriever, tenant: str, spec: CollectionSpec, batch_size: int):
        self._retriever, self._tenant, self.spec, self._batch_size = retriever, tenant, spec, batch_size
        self._buffer: dict[str, DocumentInput] = {}
        self.counts = UpsertCounts()

    async def add(self, docs: list[DocumentInput]) -> None:
        for doc in docs:
            if doc.id in self._buffer or len(self._buffer) >= self._batch_size:
                await self.flush()
            self._buffer[doc.id] = doc

    async def flush(self) -> None:
        if self._buffer:
            batch, self._buffer = list(self._buffer.values()), {}
            self.counts.add(await self._retriever.upsert(self._tenant, self.spec, batch))

    @staticmethod
    def check_collection(first: str, later: str, message_index: int) -> None:
        if later and later != first:
            raise InvalidArgument(
                "collection", f"message {message_index} names {later!r}; the stream is for {first!r}"
            )
