"""The production store: Weaviate through weaviate-client v4, with Weaviate's native multi-tenancy.

One multi-tenant Weaviate collection per ragtune collection name ("Ragtune_<name>"), one Weaviate
tenant per ragtune tenant; metadata properties carry their type in their name (m_<field>_<type>) so
two tenants may declare the same field name with different types. Collection specs live in the
multi-tenant "RagtuneCollections" collection. Weaviate has no transactions: a replace inserts the new
chunks first (rolling them back if any object fails), then deletes the document's older chunks.

Index maintenance is Weaviate's own, configured for the same behaviour as the embedded store: a *dynamic*
vector index per tenant (exact flat search while the tenant is small, HNSW from `ann_min_chunks` on),
with the server's asynchronous indexing (ASYNC_INDEXING=true, which the dynamic index needs) so an
import never waits on the graph; HNSW is extended in place, never retrained. A server without async
indexing refuses the dynamic index, and the collection then gets a plain HNSW index (indexed on write).
`index_status` reports the per-tenant indexing queue, like the embedded store's unindexed rows.
"""

from __future__ import annotations

import json
import uuid
from urllib.parse import urlparse

from ragtune.errors import AlreadyExists, NotFound, Unavailable
from services.retriever.domain import (
    AllOf,
    AnyOf,
    Between,
    Chunk,
    CollectionSpec,
    Equals,
    FieldType,
    Filter,
    Hit,
    InList,
    PreparedDocument,
    resolve_vector,
)

SPECS_COLLECTION = "RagtuneCollections"
_NAMESPACE = uuid.UUID("6f1c2a52-5b7e-4c8e-9d0a-2f1b6c3e8a41")
_DATA_TYPES = {FieldType.STRING: "TEXT", FieldType.INT: "INT", FieldType.DOUBLE: "NUMBER", FieldType.BOOL: "BOOL"}


def weaviate_collection_name(name: str) -> str:
    """An injective map of a ragtune collection name onto Weaviate's class-name alphabet ('_' -> '__', '-' -> '_d')."""
    return "Ragtune_" + name.replace("_", "__").replace("-", "_d")


def property_name(field: str, kind: FieldType) -> str:
    return f"m_{field}_{kind.value}"


def chunk_uuid(chunk: Chunk) -> uuid.UUID:
    """Deterministic per chunk and content version, so a retried import overwrites instead of duplicating."""
    return uuid.uuid5(_NAMESPACE, f"{chunk.chunk_id}\x00{chunk.content_hash}")


def chunk_properties(chunk: Chunk, spec: CollectionSpec) -> dict:
    props = {
        "chunk_id": chunk.chunk_id,
        "document_id": chunk.document_id,
        "chunk_index": chunk.chunk_index,
        "text": chunk.text,
        "content_hash": chunk.content_hash,
    }
    props.update({property_name(k, spec.fields[k]): v for k, v in chunk.metadata.items()})
    return props


def weaviate_filter(node: Filter, spec: CollectionSpec):
    """Translates a validated filter tree into weaviate-client v4 filter objects (values are passed as
    typed gRPC values, never spliced into a query string)."""
    from weaviate.classes.query import Filter as W

    if isinstance(node, AllOf):
        return W.all_of([weaviate_filter(c, spec) for c in node.filters])
    if isinstance(node, AnyOf):
        return W.any_of([weaviate_filter(c, spec) for c in node.filters])
    prop = W.by_property(property_name(node.field, spec.fields[node.field]))
    if isinstance(node, Equals):
        return prop.equal(node.value)
    if isinstance(node, InList):
        if len(node.values) == 1:
            return prop.equal(node.values[0])
        return W.any_of([prop.equal(v) for v in node.values])
    if isinstance(node, Between):
        bounds = [
            test(bound)
            for test, bound in (
                (prop.greater_than, node.gt),
                (prop.greater_or_equal, node.gte),
                (prop.less_than, node.lt),
                (prop.less_or_equal, node.lte),
            )
            if bound is not None
        ]
        return bounds[0] if len(bounds) == 1 else W.all_of(bounds)
    raise TypeError(f"unknown filter node {node!r}")


def _ids_filter(document_ids: list[str]):
    from weaviate.classes.query import Filter as W

    return W.by_property("document_id").contains_any(list(document_ids))


def vector_index_config(kind: str, ann_min_chunks: int):
    """The vector index of a data collection: "dynamic" (flat, then HNSW past the threshold; needs the server's
    ASYNC_INDEXING) or "hnsw". HNSW uses a dynamic ef (at least 100, scaled with the limit) for recall."""
    from weaviate.classes.config import Configure, VectorDistances

    hnsw = Configure.VectorIndex.hnsw(
        distance_metric=VectorDistances.COSINE, ef=-1, dynamic_ef_min=100, dynamic_ef_max=500, dynamic_ef_factor=8
    )
    if kind == "hnsw":
        return hnsw
    return Configure.VectorIndex.dynamic(
        distance_metric=VectorDistances.COSINE,
        threshold=ann_min_chunks,
        hnsw=hnsw,
        flat=Configure.VectorIndex.flat(distance_metric=VectorDistances.COSINE),
    )


class WeaviateStore:
    def __init__(self, client, *, hybrid_candidates: int = 100, ann_min_chunks: int = 10_000,
                 vector_index: str = "dynamic"):
        self._client = client
        self._hybrid_candidates = hybrid_candidates
        self._ann_min_chunks = ann_min_chunks
        self._vector_index = vector_index
        self._ensure_specs_collection()

    @classmethod
    def connect(cls, url: str, grpc_port: int, *, hybrid_candidates: int = 100, ann_min_chunks: int = 10_000,
                vector_index: str = "dynamic", api_key: str | None = None) -> "WeaviateStore":
        import weaviate
        from weaviate.classes.init import Auth

        parsed = urlparse(url)
        secure = parsed.scheme == "https"
        client = weaviate.connect_to_custom(
            http_host=parsed.hostname or "localhost",
            http_port=parsed.port or (443 if secure else 8080),
            http_secure=secure,
            grpc_host=parsed.hostname or "localhost",
            grpc_port=grpc_port,
            grpc_secure=secure,
            auth_credentials=Auth.api_key(api_key) if api_key else None,
        )
        return cls(client, hybrid_candidates=hybrid_candidates, ann_min_chunks=ann_min_chunks, vector_index=vector_index)

    def _ensure_specs_collection(self) -> None:
        from weaviate.classes.config import Configure, DataType, Property

        if not self._client.collections.exists(SPECS_COLLECTION):
            self._client.collections.create(
                SPECS_COLLECTION,
                multi_tenancy_config=Configure.multi_tenancy(enabled=True, auto_tenant_creation=True),
                vector_config=Configure.Vectors.self_provided(),
                properties=[Property(name="name", data_type=DataType.TEXT), Property(name="spec", data_type=DataType.TEXT)],
            )

    def _specs(self, tenant: str):
        return self._client.collections.get(SPECS_COLLECTION).with_tenant(tenant)

    def _has_specs(self, tenant: str) -> bool:
        # Reading a tenant Weaviate has never seen is an error, not an empty result.
        return self._client.collections.get(SPECS_COLLECTION).tenants.exists(tenant)

    def _data(self, tenant: str, name: str):
        return self._client.collections.get(weaviate_collection_name(name)).with_tenant(tenant)

    def _ensure_data_collection(self, tenant: str, spec: CollectionSpec) -> None:
        from weaviate.classes.config import DataType, Property
        from weaviate.classes.tenants import Tenant

        wanted = {property_name(k, t): getattr(DataType, _DATA_TYPES[t]) for k, t in spec.fields.items()}
        name = weaviate_collection_name(spec.name)
        if not self._client.collections.exists(name):
            self._create_data_collection(name)
        collection = self._client.collections.get(name)
        existing = {p.name for p in collection.config.get().properties}
        for prop, data_type in wanted.items():
            if prop not in existing:
                collection.config.add_property(Property(name=prop, data_type=data_type))
        if not collection.tenants.exists(tenant):
            collection.tenants.create([Tenant(name=tenant)])

    def _create_data_collection(self, name: str) -> None:
        from weaviate.classes.config import Configure, DataType, Property, Tokenization
        from weaviate.exceptions import UnexpectedStatusCodeError

        def create(kind: str) -> None:
            self._client.collections.create(
                name,
                multi_tenancy_config=Configure.multi_tenancy(enabled=True),
                vector_config=Configure.Vectors.self_provided(
                    vector_index_config=vector_index_config(kind, self._ann_min_chunks)
                ),
                properties=[
                    Property(name="chunk_id", data_type=DataType.TEXT, tokenization=Tokenization.FIELD),
                    Property(name="document_id", data_type=DataType.TEXT, tokenization=Tokenization.FIELD),
                    Property(name="chunk_index", data_type=DataType.INT),
                    Property(name="text", data_type=DataType.TEXT),
                    Property(name="content_hash", data_type=DataType.TEXT, tokenization=Tokenization.FIELD),
                ],
            )

        try:
            create(self._vector_index)
        except UnexpectedStatusCodeError as exc:
            if self._vector_index != "dynamic" or "async" not in str(exc).lower():
                raise
            create("hnsw")  # the server runs without ASYNC_INDEXING: index on write instead

    def index_status(self, tenant: str, name: str) -> dict:
        """The tenant's shard: objects, vectors still queued for the index, and the indexing state."""
        shards = [
            shard
            for node in self._client.cluster.nodes(collection=weaviate_collection_name(name), output="verbose")
            for shard in (node.shards or [])
            if shard.name == tenant
        ]
        return {
            "rows": sum(s.object_count for s in shards),
            "vector_unindexed": sum(s.vector_queue_length for s in shards),
            "running": "indexing" if any(s.vector_indexing_status == "INDEXING" for s in shards) else None,
        }

    # ---- collections --------------------------------------------------------------------------
    def create_collection(self, tenant: str, spec: CollectionSpec) -> CollectionSpec:
        specs = self._specs(tenant)
        key = uuid.uuid5(_NAMESPACE, spec.name)
        if self._has_specs(tenant) and specs.data.exists(key):
            raise AlreadyExists(f"collection {spec.name!r} already exists")
        self._ensure_data_collection(tenant, spec)
        specs.data.insert({"name": spec.name, "spec": json.dumps(spec.to_json())}, uuid=key)
        return spec

    def get_collection(self, tenant: str, name: str) -> CollectionSpec:
        if not self._has_specs(tenant):
            raise NotFound(f"collection {name!r} not found")
        obj = self._specs(tenant).query.fetch_object_by_id(uuid.uuid5(_NAMESPACE, name))
        if obj is None:
            raise NotFound(f"collection {name!r} not found")
        return CollectionSpec.from_json(json.loads(obj.properties["spec"]))

    def list_collections(self, tenant: str) -> list[CollectionSpec]:
        if not self._has_specs(tenant):
            return []
        specs = [CollectionSpec.from_json(json.loads(o.properties["spec"])) for o in self._specs(tenant).iterator()]
        return sorted(specs, key=lambda s: s.name)

    def delete_collection(self, tenant: str, name: str) -> None:
        self.get_collection(tenant, name)
        self._specs(tenant).data.delete_by_id(uuid.uuid5(_NAMESPACE, name))
        collection = self._client.collections.get(weaviate_collection_name(name))
        collection.tenants.remove([tenant])  # drops every object of this tenant in that collection

    # ---- documents ----------------------------------------------------------------------------
    def content_hashes(self, tenant: str, spec: CollectionSpec, document_ids: list[str]) -> dict[str, str]:
        from weaviate.classes.query import Filter as W

        if not document_ids:
            return {}
        result = self._data(tenant, spec.name).query.fetch_objects(
            filters=W.all_of([_ids_filter(document_ids), W.by_property("chunk_index").equal(0)]),
            limit=len(document_ids),
            return_properties=["document_id", "content_hash"],
        )
        return {o.properties["document_id"]: o.properties["content_hash"] for o in result.objects}

    def replace_documents(self, tenant: str, spec: CollectionSpec, documents: list[PreparedDocument]) -> None:
        from weaviate.classes.data import DataObject
        from weaviate.classes.query import Filter as W

        data = self._data(tenant, spec.name)
        objects = [
            DataObject(properties=chunk_properties(c, spec), uuid=chunk_uuid(c), vector=[float(x) for x in c.vector])
            for d in documents
            for c in d.chunks
        ]
        result = data.data.insert_many(objects)
        if result.has_errors:
            # Roll back what did land so no document is left half-written, then report each failure.
            data.data.delete_many(where=W.by_id().contains_any([o.uuid for o in objects]))
            details = "; ".join(f"{objects[i].properties['chunk_id']}: {e.message}" for i, e in result.errors.items())
            raise Unavailable(f"weaviate rejected {len(result.errors)} chunks: {details[:2000]}")
        for doc in documents:
            data.data.delete_many(
                where=W.all_of(
                    [W.by_property("document_id").equal(doc.id), W.by_property("content_hash").not_equal(doc.content_hash)]
                )
            )

    def delete_documents(self, tenant: str, spec: CollectionSpec, document_ids: list[str]) -> list[str]:
        found = self.content_hashes(tenant, spec, document_ids)
        if found:
            self._data(tenant, spec.name).data.delete_many(where=_ids_filter(sorted(found)))
        return [d for d in document_ids if d in found]

    def stats(self, tenant: str, spec: CollectionSpec) -> tuple[int, int]:
        from weaviate.classes.query import Filter as W

        aggregate = self._data(tenant, spec.name).aggregate
        chunks = aggregate.over_all(total_count=True).total_count or 0
        documents = aggregate.over_all(total_count=True, filters=W.by_property("chunk_index").equal(0)).total_count or 0
        return documents, chunks

    # ---- search -------------------------------------------------------------------------------
    def _hits(self, objects, spec: CollectionSpec, score_of) -> list[Hit]:
        by_property = {property_name(k, t): k for k, t in spec.fields.items()}
        hits = []
        for o in objects:
            p = o.properties
            metadata = {by_property[k]: v for k, v in p.items() if k in by_property and v is not None}
            hits.append(Hit(p["chunk_id"], p["document_id"], int(p["chunk_index"]), p["text"], metadata, score_of(o)))
        return hits

    def search(self, tenant, spec, *, mode, text, vector, top_k, alpha, filter) -> list[Hit]:
        from weaviate.classes.query import HybridFusion, MetadataQuery

        query = self._data(tenant, spec.name).query
        filters = weaviate_filter(filter, spec) if filter is not None else None
        vector = resolve_vector(vector) if mode != "keyword" else None  # one server call needs it first
        if mode == "vector":
            result = query.near_vector(
                near_vector=vector, limit=top_k, filters=filters, return_metadata=MetadataQuery(distance=True)
            )
            return self._hits(result.objects, spec, lambda o: 1.0 - float(o.metadata.distance))
        if mode == "keyword":
            result = query.bm25(
                query=text, query_properties=["text"], limit=top_k, filters=filters, return_metadata=MetadataQuery(score=True)
            )
        else:
            result = query.hybrid(
                query=text,
                vector=vector,
                alpha=alpha,
                query_properties=["text"],
                fusion_type=HybridFusion.RELATIVE_SCORE,
                limit=top_k,
                filters=filters,
                return_metadata=MetadataQuery(score=True),
            )
        return self._hits(result.objects, spec, lambda o: float(o.metadata.score))

    def close(self) -> None:
        self._client.close()
