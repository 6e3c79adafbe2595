"""The retriever's gRPC servicer: validate, call the core, let the interceptor map errors."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
from google.protobuf import any_pb2, timestamp_pb2
from google.rpc import status_pb2
from grpc_status import rpc_status

from ragtune.errors import InvalidArgument
from ragtune.models import EMBEDDING_MODEL_NAME, embedding_model_path, query_encoder_path
from ragtune.tenancy import tenant_of
from ragtune.v1 import common_pb2, retriever_pb2, retriever_pb2_grpc
from services.retriever import validation
from services.retriever.core import Retriever
from services.retriever.domain import CollectionSpec, FieldType, Hit, Scalar
from services.retriever.ingest import IngestCounts, IngestSession
from services.retriever.settings import RetrieverSettings

log = logging.getLogger(__name__)

SERVICE_NAME = retriever_pb2.DESCRIPTOR.services_by_name["RetrieverService"].full_name

_TYPE_TO_PROTO = {
    FieldType.STRING: retriever_pb2.METADATA_TYPE_STRING,
    FieldType.INT: retriever_pb2.METADATA_TYPE_INT,
    FieldType.DOUBLE: retriever_pb2.METADATA_TYPE_DOUBLE,
    FieldType.BOOL: retriever_pb2.METADATA_TYPE_BOOL,
}
_VALUE_KIND = {FieldType.STRING: "string_value", FieldType.INT: "int_value", FieldType.DOUBLE: "double_value",
               FieldType.BOOL: "bool_value"}


def collection_proto(spec: CollectionSpec) -> retriever_pb2.Collection:
    created = timestamp_pb2.Timestamp()
    created.FromDatetime(spec.create_time)
    return retriever_pb2.Collection(
        name=spec.name,
        chunking=retriever_pb2.ChunkingConfig(chunk_tokens=spec.chunk_tokens, overlap_tokens=spec.overlap_tokens),
        metadata_fields=[retriever_pb2.MetadataField(name=n, type=_TYPE_TO_PROTO[t]) for n, t in spec.fields.items()],
        create_time=created,
    )


def _value(kind: FieldType, value: Scalar) -> common_pb2.Value:
    return common_pb2.Value(**{_VALUE_KIND[kind]: value})


def hit_proto(hit: Hit, spec: CollectionSpec) -> retriever_pb2.SearchHit:
    return retriever_pb2.SearchHit(
        chunk_id=hit.chunk_id,
        document_id=hit.document_id,
        chunk_index=hit.chunk_index,
        text=hit.text,
        metadata={k: _value(spec.fields[k], v) for k, v in hit.metadata.items() if k in spec.fields},
        score=hit.score,
    )


def ingest_response(counts: IngestCounts) -> retriever_pb2.IngestResponse:
    return retriever_pb2.IngestResponse(
        upserted=counts.upserted,
        unchanged=counts.unchanged,
        chunks=counts.chunks,
        committed=counts.committed,
        committed_messages=counts.committed_messages,
    )


class IngestRejected(InvalidArgument):
    """A bad Ingest message: its BadRequest, plus the IngestResponse of what the stream committed before it."""

    def __init__(self, error: InvalidArgument, committed: retriever_pb2.IngestResponse):
        super().__init__(error.violations[0].field, error.violations[0].description, *error.violations[1:])
        self.message += (
            f" (the stream's first {committed.committed_messages} messages, {committed.committed} documents, "
            "are committed; re-send from there, or all of it: stored documents are skipped)"
        )
        self.committed = committed

    def to_status(self) -> grpc.Status:
        base = super().to_status()
        proto = status_pb2.Status.FromString(dict(base.trailing_metadata)["grpc-status-details-bin"])
        proto.message = self.message
        packed = any_pb2.Any()
        packed.Pack(self.committed)
        proto.details.append(packed)
        return rpc_status.to_status(proto)


class RetrieverServicer(retriever_pb2_grpc.RetrieverServiceServicer):
    def __init__(self, service: "RetrieverService"):
        self._service = service
        self._settings = service.settings

    @property
    def _core(self) -> Retriever:
        # Built in start() before health turns SERVING, released in stop() after the server has stopped:
        # ServiceHost's readiness gate answers UNAVAILABLE to calls outside that window.
        return self._service.retriever

    async def CreateCollection(self, request, context):
        tenant = tenant_of(context)
        spec = validation.collection_spec(request.collection)
        created = await self._core.create_collection(tenant, spec)
        return retriever_pb2.CreateCollectionResponse(collection=collection_proto(created))

    async def _collection(self, tenant: str, name: str, field: str = "collection") -> CollectionSpec:
        return await self._core.collection(tenant, validation.collection_name(name, field))

    async def GetCollection(self, request, context):
        tenant = tenant_of(context)
        spec = await self._collection(tenant, request.name, "name")
        return retriever_pb2.GetCollectionResponse(collection=collection_proto(spec))

    async def ListCollections(self, request, context):
        tenant = tenant_of(context)
        specs = await self._core.list_collections(tenant)
        return retriever_pb2.ListCollectionsResponse(collections=[collection_proto(s) for s in specs])

    async def DeleteCollection(self, request, context):
        tenant = tenant_of(context)
        await self._core.delete_collection(tenant, validation.collection_name(request.name, "name"))
        return retriever_pb2.DeleteCollectionResponse()

    async def UpsertDocuments(self, request, context):
        tenant = tenant_of(context)
        spec = await self._collection(tenant, request.collection)
        docs = validation.documents(request.documents, spec, self._settings)
        counts = await self._core.upsert(tenant, spec, docs)
        return retriever_pb2.UpsertDocumentsResponse(
            upserted=counts.upserted, unchanged=counts.unchanged, chunks=counts.chunks
        )

    async def Ingest(self, request_iterator, context):
        tenant = tenant_of(context)
        session: IngestSession | None = None
        index = 0
        try:
            async for message in request_iterator:
                if session is None:
                    spec = await self._collection(tenant, message.collection, "messages[0].collection")
                    session = IngestSession(
                        self._core, tenant, spec, batch_documents=self._settings.max_batch_documents,
                        batch_bytes=self._settings.ingest_batch_bytes,
                    )
                try:
                    docs = validation.ingest_message(message, index, session.spec, self._settings)
                except InvalidArgument as bad:
                    # Nothing valid is lost: commit every message before the bad one, then report both.
                    raise IngestRejected(bad, ingest_response(await session.finish())) from None
                await session.add(index, docs)
                index += 1
            if session is None:
                raise InvalidArgument("messages", "the stream carried no message; the first must name the collection")
            return ingest_response(await session.finish())
        finally:
            if session is not None:
                await session.close()

    async def DeleteDocuments(self, request, context):
        tenant = tenant_of(context)
        spec = await self._collection(tenant, request.collection)
        ids = validation.document_ids(request.document_ids)
        deleted, missing = await self._core.delete_documents(tenant, spec, ids)
        return retriever_pb2.DeleteDocumentsResponse(deleted=deleted, not_found_ids=missing)

    async def Search(self, request, context):
        tenant = tenant_of(context)
        name = validation.collection_name(request.collection, "collection")
        spec, hits = await self._core.search(
            tenant, name, lambda spec: validation.search_query(request, spec, self._settings)
        )
        return retriever_pb2.SearchResponse(hits=[hit_proto(h, spec) for h in hits])

    async def Embed(self, request, context):
        texts = validation.embed_texts(request.texts, self._settings)
        vectors, tokens = await self._core.embed(texts)
        return embed_response(vectors, tokens, EMBEDDING_MODEL_NAME)

    async def GetCollectionStats(self, request, context):
        tenant = tenant_of(context)
        spec = await self._collection(tenant, request.collection)
        documents, chunks = await self._core.stats(tenant, spec)
        return retriever_pb2.GetCollectionStatsResponse(documents=documents, chunks=chunks)


def embed_response(vectors: list[list[float]], tokens: list[int], model: str) -> retriever_pb2.EmbedResponse:
    return retriever_pb2.EmbedResponse(
        embeddings=[retriever_pb2.Embedding(vector=v, tokens=n) for v, n in zip(vectors, tokens)],
        model=model,
        total_tokens=sum(tokens),
    )


def query_encoder(settings: RetrieverSettings) -> Path | None:
    """The ONNX export that embeds search queries, or None for torch (RAGTUNE_RETRIEVER_QUERY_ENCODER)."""
    if settings.query_encoder == "torch":
        return None
    path = query_encoder_path(settings.model_cache)
    if path is None and settings.query_encoder == "onnx":
        raise RuntimeError(
            f"RAGTUNE_RETRIEVER_QUERY_ENCODER=onnx but {settings.model_cache} holds no ONNX export of the "
            "installed embedding model: run python -m ragtune.models (scripts/setup.sh does)"
        )
    return path


def open_store(settings: RetrieverSettings, dimension: int):
    """The configured backend (imported lazily: each pulls in its own client library)."""
    if settings.backend == "weaviate":
        from services.retriever.backends.weaviate_store import WeaviateStore

        if not settings.weaviate_url:
            raise RuntimeError("RAGTUNE_RETRIEVER_BACKEND=weaviate needs WEAVIATE_URL")
        return WeaviateStore.connect(
            settings.weaviate_url,
            settings.weaviate_grpc_port,
            hybrid_candidates=settings.hybrid_candidates,
            ann_min_chunks=settings.ann_min_chunks,
            vector_index=settings.weaviate_vector_index,
            api_key=settings.weaviate_api_key.get_secret_value() if settings.weaviate_api_key else None,
        )
    from services.retriever.backends.lancedb.store import LanceDBStore

    return LanceDBStore(
        settings.store_dir,
        dimension,
        ann_min_chunks=settings.ann_min_chunks,
        ann_reindex_fraction=settings.ann_reindex_fraction,
        ann_rows_per_partition=settings.ann_rows_per_partition,
        hybrid_candidates=settings.hybrid_candidates,
        ann_ef=settings.ann_ef,
        index_nice=settings.index_nice,
        index_idle=settings.background_cpu == "idle",
        index_quiet_s=settings.index_quiet_s or None,
    )


class RetrieverService:
    """Hosts the retriever: opens the store and the embedder on start, closes them on stop."""

    service_names = (SERVICE_NAME,)

    def __init__(self, settings: RetrieverSettings):
        self.settings = settings
        self.retriever: Retriever | None = None

    def register(self, server: grpc.aio.Server) -> None:
        retriever_pb2_grpc.add_RetrieverServiceServicer_to_server(RetrieverServicer(self), server)

    async def start(self) -> None:
        def build() -> Retriever:
            from services.retriever.embedding import Embedder

            embedder = Embedder(
                embedding_model_path(),
                self.settings.embedding_batch_size,
                self.settings.embedding_precision,
                query_encoder=query_encoder(self.settings),
                query_threads=self.settings.query_encoder_threads,
            )
            # The first forward passes allocate; pay them before SERVING.
            embedder.embed(["warm-up"])
            embedder.embed_query("warm-up")
            log.info("embedding model computes in %s (RAGTUNE_RETRIEVER_EMBEDDING_PRECISION=%s); queries in %s "
                     "(RAGTUNE_RETRIEVER_QUERY_ENCODER=%s) on %d thread(s) a query "
                     "(RAGTUNE_RETRIEVER_QUERY_ENCODER_THREADS=%d)", embedder.precision,
                     self.settings.embedding_precision, embedder.query_runtime, self.settings.query_encoder,
                     embedder.query_threads, self.settings.query_encoder_threads)
            return Retriever(open_store(self.settings, embedder.dimension), embedder, ingest_nice=self.settings.ingest_nice,
                             ingest_idle=self.settings.background_cpu == "idle")

        self.retriever = await asyncio.to_thread(build)

    async def stop(self) -> None:
        if self.retriever is not None:
            await asyncio.to_thread(self.retriever.close)
            self.retriever = None
