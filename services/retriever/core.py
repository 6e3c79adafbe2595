"""The retriever's logic without gRPC: collections, idempotent all-or-nothing upserts, and search."""

from __future__ import annotations

import asyncio
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

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
from services.retriever.embedding import Embedder, lower_thread_priority, single_threaded_inference


@dataclass
class UpsertCounts:
    upserted: int = 0
    unchanged: int = 0  # skipped: already stored with the same content hash
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


@dataclass(frozen=True)
class Prepared:
    """A batch ready to write: the changed documents, chunked and embedded, and what was skipped."""

    documents: list[PreparedDocument]
    unchanged: int


class Retriever:
    """Runs every blocking step (store, tokenizer, model) off the event loop so it keeps serving.

    Ingest batches are embedded on one dedicated thread whose CPU priority is lowered by `ingest_nice` (and,
    with `ingest_idle`, put in Linux's SCHED_IDLE class), so a
    search's query embedding (its own threads, normal priority) is served first while an ingest runs."""

    def __init__(self, store: VectorStore, embedder: Embedder, *, ingest_nice: int = 10, ingest_idle: bool = False):
        self.store = store
        self.embedder = embedder
        self.chunker = Chunker(embedder.tokenizer)
        self._bulk = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="embed-ingest", initializer=lower_thread_priority,
            initargs=(ingest_nice, ingest_idle),
        )
        # Searches run whole on these threads (the query embedding and the store's call). torch queries use one
        # core each; ONNX Runtime queries up to RAGTUNE_RETRIEVER_QUERY_ENCODER_THREADS (embedding._onnx_session).
        self._queries = ThreadPoolExecutor(
            max_workers=4, thread_name_prefix="embed-query", initializer=single_threaded_inference
        )

    def close(self) -> None:
        # Don't wait for an ingest batch still embedding (the RPCs are over; it would only delay shutdown
        # by its length): the store closes now and stops its index job.
        self._bulk.shutdown(wait=False, cancel_futures=True)
        self._queries.shutdown(wait=False, cancel_futures=True)
        self.store.close()

    # ---- collections --------------------------------------------------------------------------
    async def create_collection(self, tenant: str, spec: CollectionSpec) -> CollectionSpec:
        return await asyncio.to_thread(self.store.create_collection, tenant, spec)

    async def collection(self, tenant: str, name: str) -> CollectionSpec:
        """The tenant's collection; NotFound if it has none of that name (the name is validated already)."""
        return await asyncio.to_thread(self.store.get_collection, tenant, name)

    async def list_collections(self, tenant: str) -> list[CollectionSpec]:
        return await asyncio.to_thread(self.store.list_collections, tenant)

    async def delete_collection(self, tenant: str, name: str) -> None:
        await asyncio.to_thread(self.store.delete_collection, tenant, name)

    async def stats(self, tenant: str, spec: CollectionSpec) -> tuple[int, int]:
        return await asyncio.to_thread(self.store.stats, tenant, spec)

    # ---- documents ----------------------------------------------------------------------------
    def _embed_documents(self, spec: CollectionSpec, docs: list[DocumentInput], hashes: dict[str, str]) -> list[PreparedDocument]:
        # One tokenizer pass per document: the chunker's token ids go straight to the model.
        split = [self.chunker.split(d.text, spec.chunk_tokens, spec.overlap_tokens) for d in docs]
        vectors = self.embedder.embed_token_ids([c.token_ids for chunks in split for c in chunks])
        prepared, row = [], 0
        for doc, chunks in zip(docs, split):
            stored = []
            for c in chunks:
                stored.append(Chunk(doc.id, c.index, c.text, vectors[row], doc.metadata, hashes[doc.id]))
                row += 1
            prepared.append(PreparedDocument(doc.id, hashes[doc.id], stored))
        return prepared

    async def prepare(
        self, tenant: str, spec: CollectionSpec, docs: list[DocumentInput], known: dict[str, str] | None = None
    ) -> Prepared:
        """Drops the documents stored unchanged (same content hash; `known` adds hashes being written now) and
        chunks and embeds the rest on the ingest thread."""
        hashes = {d.id: content_hash(d, spec) for d in docs}
        stored = await asyncio.to_thread(self.store.content_hashes, tenant, spec, list(hashes))
        if known:
            stored.update({k: v for k, v in known.items() if k in hashes})
        changed = [d for d in docs if stored.get(d.id) != hashes[d.id]]
        documents = []
        if changed:
            loop = asyncio.get_running_loop()
            documents = await loop.run_in_executor(self._bulk, self._embed_documents, spec, changed, hashes)
        return Prepared(documents, len(docs) - len(changed))

    async def write(self, tenant: str, spec: CollectionSpec, prepared: Prepared) -> UpsertCounts:
        """Writes a prepared batch in one all-or-nothing store call."""
        if prepared.documents:
            await asyncio.to_thread(self.store.replace_documents, tenant, spec, prepared.documents)
        return UpsertCounts(
            upserted=len(prepared.documents),
            unchanged=prepared.unchanged,
            chunks=sum(len(p.chunks) for p in prepared.documents),
        )

    async def upsert(self, tenant: str, spec: CollectionSpec, docs: list[DocumentInput]) -> UpsertCounts:
        """Writes the changed documents of a validated batch in one all-or-nothing store call."""
        return await self.write(tenant, spec, await self.prepare(tenant, spec, docs))

    async def delete_documents(self, tenant: str, spec: CollectionSpec, ids: list[str]) -> tuple[int, list[str]]:
        deleted = set(await asyncio.to_thread(self.store.delete_documents, tenant, spec, ids))
        return len(deleted), [d for d in ids if d not in deleted]

    # ---- embeddings ---------------------------------------------------------------------------
    async def embed(self, texts: list[str]) -> tuple[list[list[float]], list[int]]:
        """Vectors (unit length) and token counts of texts, on the query threads: Embed is interactive."""
        loop = asyncio.get_running_loop()

        def run() -> tuple[list[list[float]], list[int]]:
            return self.embedder.embed(texts).tolist(), self.embedder.token_counts(texts)

        return await loop.run_in_executor(self._queries, run)

    # ---- search -------------------------------------------------------------------------------
    async def search(
        self, tenant: str, name: str, query_for: Callable[[CollectionSpec], SearchQuery]
    ) -> tuple[CollectionSpec, list[Hit]]:
        """Looks the collection up, builds the query against it (`query_for` validates, and may raise) and
        searches, all on one query thread (one hop from the event loop, not one for the lookup and another for
        the search). The store asks for the query's vector when it needs it, so a hybrid search's keyword side
        starts first and overlaps the embedding."""

        def run() -> tuple[CollectionSpec, list[Hit]]:
            spec = self.store.get_collection(tenant, name)
            query = query_for(spec)
            # Hybrid always sends a vector: Weaviate would otherwise try to vectorize the query itself.
            needs_vector = query.mode in (SearchMode.VECTOR, SearchMode.HYBRID)

            def query_vector() -> list[float]:
                return self.embedder.embed_query(query.text).tolist()

            return spec, self.store.search(
                tenant,
                spec,
                mode=query.mode.value,
                text=query.text,
                vector=query_vector if needs_vector else None,
                top_k=query.top_k,
                alpha=query.alpha,
                filter=query.filter,
            )

        return await asyncio.get_running_loop().run_in_executor(self._queries, run)
