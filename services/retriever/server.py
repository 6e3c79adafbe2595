"""The retriever's gRPC servicer: validate, call the core, let the interceptor map errors."""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf import timestamp_pb2

from ragtune.errors import InvalidArgument, Unavailable
from ragtune.models import embedding_model_path
from ragtune.tenancy import tenant_of
from ragtune.v1 import common_pb2, retriever_pb2, retriever_pb2_grpc
from services.retriever import validation
from services.retriever.core import IngestSession, Retriever
from services.retriever.domain import CollectionSpec, FieldType, Hit, Scalar
from services.retriever.settings import RetrieverSettings

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


class RetrieverServicer(retriever_pb2_grpc.RetrieverServiceServicer):
    def __init__(self, service: "RetrieverService"):
        self._service = service
        self._settings = service.settings

    @property
    def _core(self) -> Retriever:
        if self._service.retriever is None:
            raise Unavailable("the retriever is starting or stopping")
        return self._service.retriever

    async def CreateCollection(self, request, context):
        tenant = tenant_of(context)
        spec = validation.collection_spec(request.collection)
        created = await self._core.create_collection(tenant, spec)
        return retriever_pb2.CreateCollectionResponse(collection=collection_proto(created))

    async def GetCollection(self, request, context):
        tenant = tenant_of(context)
        spec = await self._core.collection(tenant, request.name)
        return retriever_pb2.GetCollectionResponse(collection=collection_proto(spec))

    async def ListCollections(self, request, context):
        tenant = tenant_of(context)
        specs = await self._core.list_collections(tenant)
        return retriever_pb2.ListCollectionsResponse(collections=[collection_proto(s) for s in specs])

    async def DeleteCollection(self, request, context):
        tenant = tenant_of(context)
        await self._core.delete_collection(tenant, request.name)
        return retriever_pb2.DeleteCollectionResponse()

    async def UpsertDocuments(self, request, context):
        tenant = tenant_of(context)
        spec = await self._core.collection(tenant, request.collection, "collection")
        docs = validation.documents(request.documents, spec, self._settings)
        counts = await self._core.upsert(tenant, spec, docs)
        return retriever_pb2.UpsertDocumentsResponse(
            upserted=counts.upserted, unchanged=counts.unchanged, chunks=counts.chunks
        )

    async def Ingest(self, request_iterator, context):
        tenant = tenant_of(context)
        session: IngestSession | None = None
        index = 0
        async for message in request_iterator:
            if session is None:
                spec = await self._core.collection(tenant, message.collection, "collection")
                session = IngestSession(self._core, tenant, spec, self._settings.max_batch_documents)
            else:
                IngestSession.check_collection(session.spec.name, message.collection, index)
            await session.add(
                validation.documents(message.documents, session.spec, self._settings, where=f"message {index}: ")
            )
            index += 1
        if session is None:
            raise InvalidArgument("collection", "the stream carried no message; the first must name the collection")
        await session.flush()
        c = session.counts
        return retriever_pb2.IngestResponse(upserted=c.upserted, unchanged=c.unchanged, chunks=c.chunks)

    async def DeleteDocuments(self, request, context):
        tenant = tenant_of(context)
        spec = await self._core.collection(tenant, request.collection, "collection")
        ids = validation.document_ids(request.document_ids)
        deleted, missing = await self._core.delete_documents(tenant, spec, ids)
        return retriever_pb2.DeleteDocumentsResponse(deleted=deleted, not_found_ids=missing)

    async def Search(self, request, context):
        tenant = tenant_of(context)
        spec = await self._core.collection(tenant, request.collection, "collection")
        query = validation.search_query(request, spec, self._settings)
        hits = await self._core.search(tenant, spec, query)
        return retriever_pb2.SearchResponse(hits=[hit_proto(h, spec) for h in hits])

    async def GetCollectionStats(self, request, context):
        tenant = tenant_of(context)
        spec = await self._core.collection(tenant, request.collection, "collection")
        documents, chunks = await self._core.stats(tenant, spec)
        return retriever_pb2.GetCollectionStatsResponse(documents=documents, chunks=chunks)


def open_store(settings: RetrieverSettings, dimension: int):
    """The configured backend (imported lazily: each pulls in its own client library)."""
    if settings.backend == "weaviate":
        from services.retriever.backends.weaviate_store import WeaviateStore

        if not settings.weaviate_url:
            raise RuntimeError("RAGTUNE_RETRIEVER_BACKEND=weaviate needs WEAVIATE_URL")
        return WeaviateStore.connect(
            settings.weaviate_url, settings.weaviate_grpc_port, hybrid_candidates=settings.hybrid_candidates,
            api_key=settings.weaviate_api_key.get_secret_value() if settings.weaviate_api_key else None,
        )
    from services.retriever.backends.lancedb_store import LanceDBStore

    return LanceDBStore(
        settings.store_dir,
        dimension,
        ann_min_chunks=settings.ann_min_chunks,
        ann_reindex_fraction=settings.ann_reindex_fraction,
        hybrid_candidates=settings.hybrid_candidates,
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

            embedder = Embedder(embedding_model_path(), self.settings.embedding_batch_size)
            embedder.embed(["warm-up"])  # first forward pass allocates; pay it before SERVING
            return Retriever(open_store(self.settings, embedder.dimension), embedder)

        self.retriever = await asyncio.to_thread(build)

    async def stop(self) -> None:
        if self.retriever is not None:
            await asyncio.to_thread(self.retriever.store.close)
            self.retriever = None
