"""What the retriever tests share: a client bound to a tenant, request builders and the wiki100 sample."""

from __future__ import annotations

import uuid

import grpc
import pytest

from ragtune.errors import bad_request_violations
from clients.samples import wiki100_dir
from ragtune.values import from_value, to_value as value
from ragtune.tenancy import tenant_metadata
from ragtune.v1 import retriever_pb2, retriever_pb2_grpc

R = retriever_pb2


def wiki_articles(names: list[str], max_chars: int) -> dict[str, str]:
    return {n: (wiki100_dir() / f"{n}.txt").read_text()[:max_chars] for n in names}


def plain(metadata) -> dict:
    return {k: from_value(v) for k, v in metadata.items()}


def doc(doc_id: str, text: str, **metadata) -> retriever_pb2.Document:
    return R.Document(id=doc_id, text=text, metadata={k: value(v) for k, v in metadata.items()})


def cond(field: str, **test) -> retriever_pb2.Filter:
    if "equals" in test:
        return R.Filter(condition=R.FieldCondition(field=field, equals=value(test["equals"])))
    if "in_list" in test:
        return R.Filter(
            condition=R.FieldCondition(field=field, in_list=R.ValueList(values=[value(v) for v in test["in_list"]]))
        )
    return R.Filter(condition=R.FieldCondition(field=field, range=R.Range(**test)))


def all_of(*filters) -> retriever_pb2.Filter:
    return R.Filter(all=R.FilterGroup(filters=list(filters)))


def any_of(*filters) -> retriever_pb2.Filter:
    return R.Filter(any=R.FilterGroup(filters=list(filters)))


FIELDS = [
    R.MetadataField(name="year", type=R.METADATA_TYPE_INT),
    R.MetadataField(name="lang", type=R.METADATA_TYPE_STRING),
    R.MetadataField(name="rating", type=R.METADATA_TYPE_DOUBLE),
    R.MetadataField(name="public", type=R.METADATA_TYPE_BOOL),
]


def unique_name(prefix: str = "c") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Client:
    """A stub whose every call carries one tenant (or none, with tenant=None)."""

    def __init__(self, channel: grpc.Channel, tenant: str | None):
        self._stub = retriever_pb2_grpc.RetrieverServiceStub(channel)
        self._metadata = tenant_metadata(tenant) if tenant else ()

    def __getattr__(self, rpc: str):
        method = getattr(self._stub, rpc)
        return lambda request, **kw: method(request, metadata=self._metadata, timeout=kw.pop("timeout", 120), **kw)

    # Shortcuts for the calls most tests make.
    def create(self, name: str, fields=FIELDS, chunk_tokens: int = 0, overlap_tokens: int = 0):
        chunking = R.ChunkingConfig(chunk_tokens=chunk_tokens, overlap_tokens=overlap_tokens)
        return self.CreateCollection(
            R.CreateCollectionRequest(collection=R.Collection(name=name, chunking=chunking, metadata_fields=fields))
        ).collection

    def upsert(self, name: str, *docs):
        return self.UpsertDocuments(R.UpsertDocumentsRequest(collection=name, documents=list(docs)))

    def search(self, name: str, query: str, mode=R.SEARCH_MODE_HYBRID, top_k: int = 10, alpha=None, filter=None):
        request = R.SearchRequest(collection=name, query=query, mode=mode, top_k=top_k, filter=filter)
        if alpha is not None:
            request.alpha = alpha
        return list(self.Search(request).hits)

    def stats(self, name: str) -> tuple[int, int]:
        reply = self.GetCollectionStats(R.GetCollectionStatsRequest(collection=name))
        return reply.documents, reply.chunks


def expect_error(call, code: grpc.StatusCode, field: str | None = None) -> grpc.RpcError:
    """Runs call(), asserts it fails with `code` and, if given, a BadRequest violation naming `field`."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    assert error.code() == code, f"{error.code()}: {error.details()}"
    if field is not None:
        fields = [v.field for v in bad_request_violations(error)]
        assert field in fields, f"expected a violation on {field!r}, got {fields} ({error.details()})"
    return error
