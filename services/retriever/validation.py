"""Turns retriever requests (protobuf, servicer side) into checked domain objects, every problem a FieldViolation."""

from __future__ import annotations

import math
from datetime import datetime, timezone

from ragtune.errors import FieldViolation, InvalidArgument
from ragtune.naming import FIELD_NAME, RESOURCE_NAME
from ragtune.v1 import common_pb2, retriever_pb2
from services.retriever.domain import (
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_OVERLAP_TOKENS,
    MAX_CHUNK_TOKENS,
    AllOf,
    AnyOf,
    Between,
    CollectionSpec,
    DocumentInput,
    Equals,
    FieldType,
    Filter,
    InList,
    Scalar,
    SearchMode,
    SearchQuery,
)
from services.retriever.settings import RetrieverSettings

MAX_DOCUMENT_ID_CHARS = 256
MAX_METADATA_FIELDS = 64
MAX_FILTER_DEPTH = 8
DEFAULT_TOP_K = 10
DEFAULT_ALPHA = 0.5

_TYPES = {
    retriever_pb2.METADATA_TYPE_STRING: FieldType.STRING,
    retriever_pb2.METADATA_TYPE_INT: FieldType.INT,
    retriever_pb2.METADATA_TYPE_DOUBLE: FieldType.DOUBLE,
    retriever_pb2.METADATA_TYPE_BOOL: FieldType.BOOL,
}
_MODES = {
    retriever_pb2.SEARCH_MODE_UNSPECIFIED: SearchMode.HYBRID,
    retriever_pb2.SEARCH_MODE_HYBRID: SearchMode.HYBRID,
    retriever_pb2.SEARCH_MODE_VECTOR: SearchMode.VECTOR,
    retriever_pb2.SEARCH_MODE_KEYWORD: SearchMode.KEYWORD,
}


def _raise_if(violations: list[FieldViolation]) -> None:
    if violations:
        raise InvalidArgument.of(violations)


def collection_name(name: str, field: str) -> str:
    return RESOURCE_NAME.check(name, field)


def collection_spec(proto: retriever_pb2.Collection) -> CollectionSpec:
    """A CreateCollection request's collection, defaults filled in."""
    bad: list[FieldViolation] = []
    if violation := RESOURCE_NAME.violation(proto.name, "collection.name"):
        bad.append(violation)
    chunk_tokens = proto.chunking.chunk_tokens or DEFAULT_CHUNK_TOKENS
    overlap = proto.chunking.overlap_tokens or min(DEFAULT_OVERLAP_TOKENS, chunk_tokens // 5)
    if not 1 <= chunk_tokens <= MAX_CHUNK_TOKENS:
        bad.append(FieldViolation("collection.chunking.chunk_tokens", f"must be in [1, {MAX_CHUNK_TOKENS}]"))
    elif not 0 <= overlap < chunk_tokens:
        bad.append(FieldViolation("collection.chunking.overlap_tokens", "must be >= 0 and less than chunk_tokens"))
    fields: dict[str, FieldType] = {}
    if len(proto.metadata_fields) > MAX_METADATA_FIELDS:
        bad.append(FieldViolation("collection.metadata_fields", f"at most {MAX_METADATA_FIELDS} fields"))
    for i, f in enumerate(proto.metadata_fields):
        path = f"collection.metadata_fields[{i}]"
        if violation := FIELD_NAME.violation(f.name, f"{path}.name"):
            bad.append(violation)
        elif f.name in fields:
            bad.append(FieldViolation(f"{path}.name", f"duplicate field {f.name!r}"))
        if f.type not in _TYPES:
            bad.append(FieldViolation(f"{path}.type", "must be STRING, INT, DOUBLE or BOOL"))
        else:
            fields[f.name] = _TYPES[f.type]
    _raise_if(bad)
    return CollectionSpec(proto.name, chunk_tokens, overlap, fields, datetime.now(timezone.utc))


def _scalar(value: common_pb2.Value) -> Scalar | None:
    kind = value.WhichOneof("kind")
    return None if kind is None else getattr(value, kind)


def _typed(value: common_pb2.Value, expected: FieldType) -> tuple[Scalar | None, str | None]:
    """The Python value if it fits the declared type (an int is accepted for a double), else an error text."""
    kind = value.WhichOneof("kind")
    if kind is None:
        return None, "a value must be set"
    raw = getattr(value, kind)
    if expected is FieldType.STRING and kind == "string_value":
        return raw, None
    if expected is FieldType.INT and kind == "int_value":
        return raw, None
    if expected is FieldType.BOOL and kind == "bool_value":
        return raw, None
    if expected is FieldType.DOUBLE and kind in ("double_value", "int_value"):
        if not math.isfinite(raw):
            return None, "must be a finite number"
        return float(raw), None
    return None, f"field is declared {expected.value}, got {kind}"


def documents(protos, spec: CollectionSpec, settings: RetrieverSettings, field: str = "documents") -> list[DocumentInput]:
    """Every document of a batch checked against the collection and the size limits; any problem rejects the
    batch. `field` is the path of the repeated field (e.g. messages[3].documents in a stream)."""
    return _documents(protos, spec, settings, field)


def ingest_message(message: retriever_pb2.IngestRequest, index: int, spec: CollectionSpec,
                   settings: RetrieverSettings) -> list[DocumentInput]:
    """One message of an Ingest stream; violations are named messages[<index>].<field>."""
    where = f"messages[{index}]"
    if message.collection and message.collection != spec.name:
        raise InvalidArgument(f"{where}.collection", f"names {message.collection!r}; the stream is for {spec.name!r}")
    return _documents(message.documents, spec, settings, f"{where}.documents")


def _documents(protos, spec: CollectionSpec, settings: RetrieverSettings, field: str) -> list[DocumentInput]:
    bad: list[FieldViolation] = []
    if not protos:
        bad.append(FieldViolation(field, "at least one document is required"))
    elif len(protos) > settings.max_batch_documents:
        bad.append(FieldViolation(field, f"at most {settings.max_batch_documents} documents per batch, got {len(protos)}"))
    _raise_if(bad)
    seen: set[str] = set()
    result = []
    for i, doc in enumerate(protos):
        path = f"{field}[{i}]"
        if not doc.id:
            bad.append(FieldViolation(f"{path}.id", "must not be empty"))
        elif len(doc.id) > MAX_DOCUMENT_ID_CHARS:
            bad.append(FieldViolation(f"{path}.id", f"at most {MAX_DOCUMENT_ID_CHARS} characters"))
        elif doc.id in seen:
            bad.append(FieldViolation(f"{path}.id", f"duplicate id {doc.id!r} in this batch"))
        seen.add(doc.id)
        if not doc.text.strip():
            bad.append(FieldViolation(f"{path}.text", "must not be empty"))
        else:
            size = len(doc.text.encode("utf-8"))
            if size > settings.max_document_bytes:
                bad.append(
                    FieldViolation(f"{path}.text", f"{size} bytes exceeds the maximum of {settings.max_document_bytes}")
                )
        metadata: dict[str, Scalar] = {}
        for key in sorted(doc.metadata):
            if key not in spec.fields:
                bad.append(FieldViolation(f"{path}.metadata[{key}]", f"field {key!r} is not declared by the collection"))
                continue
            value, error = _typed(doc.metadata[key], spec.fields[key])
            if error:
                bad.append(FieldViolation(f"{path}.metadata[{key}]", error))
            else:
                metadata[key] = value
        result.append(DocumentInput(doc.id, doc.text, metadata))
    _raise_if(bad)
    return result


def search_query(request: retriever_pb2.SearchRequest, spec: CollectionSpec, settings: RetrieverSettings) -> SearchQuery:
    bad: list[FieldViolation] = []
    if not request.query.strip():
        bad.append(FieldViolation("query", "must not be empty"))
    top_k = request.top_k or DEFAULT_TOP_K
    if not 1 <= top_k <= settings.max_top_k:
        bad.append(FieldViolation("top_k", f"must be in [1, {settings.max_top_k}] (0 means {DEFAULT_TOP_K})"))
    alpha = request.alpha if request.HasField("alpha") else DEFAULT_ALPHA
    if not 0.0 <= alpha <= 1.0:  # also rejects NaN
        bad.append(FieldViolation("alpha", "must be in [0, 1] (1 is pure vector, 0 pure keyword)"))
    if request.mode not in _MODES:
        bad.append(FieldViolation("mode", "unknown search mode"))
    parsed = None
    if request.HasField("filter"):
        parsed = _filter(request.filter, spec, settings, "filter", 1, bad)
    _raise_if(bad)
    return SearchQuery(spec.name, request.query, _MODES[request.mode], top_k, float(alpha), parsed)


def _filter(proto, spec, settings, path: str, depth: int, bad: list[FieldViolation]) -> Filter | None:
    if depth > MAX_FILTER_DEPTH:
        bad.append(FieldViolation(path, f"filters nest at most {MAX_FILTER_DEPTH} deep"))
        return None
    kind = proto.WhichOneof("kind")
    if kind is None:
        bad.append(FieldViolation(path, "set one of condition, all or any"))
        return None
    if kind in ("all", "any"):
        members = proto.all.filters if kind == "all" else proto.any.filters
        if not members:
            bad.append(FieldViolation(f"{path}.{kind}.filters", "at least one filter is required"))
            return None
        parsed = tuple(
            _filter(m, spec, settings, f"{path}.{kind}.filters[{i}]", depth + 1, bad) for i, m in enumerate(members)
        )
        return (AllOf if kind == "all" else AnyOf)(parsed)
    return _condition(proto.condition, spec, settings, f"{path}.condition", bad)


def _condition(proto, spec: CollectionSpec, settings, path: str, bad: list[FieldViolation]) -> Filter | None:
    declared = spec.fields.get(proto.field)
    if declared is None:
        bad.append(FieldViolation(f"{path}.field", f"{proto.field!r} is not a declared metadata field"))
        return None
    test = proto.WhichOneof("test")
    if test is None:
        bad.append(FieldViolation(path, "set one of equals, range or in_list"))
        return None
    if test == "equals":
        value, error = _typed(proto.equals, declared)
        if error:
            bad.append(FieldViolation(f"{path}.equals", error))
            return None
        return Equals(proto.field, value)
    if test == "in_list":
        values = proto.in_list.values
        if not values or len(values) > settings.max_filter_values:
            bad.append(FieldViolation(f"{path}.in_list.values", f"1 to {settings.max_filter_values} values"))
            return None
        parsed = []
        for i, v in enumerate(values):
            value, error = _typed(v, declared)
            if error:
                bad.append(FieldViolation(f"{path}.in_list.values[{i}]", error))
            parsed.append(value)
        return InList(proto.field, tuple(parsed))
    bounds = {b: getattr(proto.range, b) for b in ("gt", "gte", "lt", "lte") if proto.range.HasField(b)}
    if not declared.numeric:
        bad.append(FieldViolation(f"{path}.range", f"ranges apply to int and double fields; {proto.field!r} is {declared.value}"))
        return None
    if not bounds:
        bad.append(FieldViolation(f"{path}.range", "set at least one bound"))
        return None
    if ("gt" in bounds and "gte" in bounds) or ("lt" in bounds and "lte" in bounds):
        bad.append(FieldViolation(f"{path}.range", "set at most one lower and one upper bound"))
        return None
    if not all(math.isfinite(v) for v in bounds.values()):
        bad.append(FieldViolation(f"{path}.range", "bounds must be finite numbers"))
        return None
    if declared is FieldType.INT:
        bounds = _integer_bounds(bounds)
    return Between(proto.field, **bounds)


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _integer_bounds(bounds: dict[str, float]) -> dict[str, int]:
    """The same range over integers (x > 2.5 is x > 2, x < 2.5 is x < 3), kept inside int64, so the
    store compares ints with ints."""
    rounded = {
        "gt": math.floor(bounds["gt"]) if "gt" in bounds else None,
        "gte": math.ceil(bounds["gte"]) if "gte" in bounds else None,
        "lt": math.ceil(bounds["lt"]) if "lt" in bounds else None,
        "lte": math.floor(bounds["lte"]) if "lte" in bounds else None,
    }
    return {k: min(max(v, _INT64_MIN), _INT64_MAX) for k, v in rounded.items() if v is not None}


MAX_DELETE_IDS = 10_000


def document_ids(ids, field: str = "document_ids") -> list[str]:
    bad = [FieldViolation(f"{field}[{i}]", "must not be empty") for i, d in enumerate(ids) if not d]
    if not ids or len(ids) > MAX_DELETE_IDS:
        bad.append(FieldViolation(field, f"1 to {MAX_DELETE_IDS} ids"))
    _raise_if(bad)
    return list(dict.fromkeys(ids))


def embed_texts(texts, settings: RetrieverSettings, field: str = "texts") -> list[str]:
    """The texts of an Embed call: at least one, at most max_embed_texts, none empty or oversized."""
    texts = list(texts)
    if not texts:
        raise InvalidArgument(field, "at least one text is required")
    if len(texts) > settings.max_embed_texts:
        raise InvalidArgument(
            field, f"at most {settings.max_embed_texts} texts a call (RAGTUNE_RETRIEVER_MAX_EMBED_TEXTS), got {len(texts)}"
        )
    bad: list[FieldViolation] = []
    for i, text in enumerate(texts):
        if not text.strip():
            bad.append(FieldViolation(f"{field}[{i}]", "must not be empty"))
        elif len(text.encode()) > settings.max_document_bytes:
            bad.append(FieldViolation(f"{field}[{i}]", f"at most {settings.max_document_bytes} UTF-8 bytes"))
    _raise_if(bad)
    return texts
