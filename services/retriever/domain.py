"""The retriever's plain data types: collections, documents, chunks, filters and hits (no gRPC)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, Literal, Sequence, Union

Scalar = Union[str, int, float, bool]
# The embedding model's number format: auto is bfloat16 where the CPU computes it natively (embedding.py).
EmbeddingPrecision = Literal["auto", "float32", "bfloat16"]


class FieldType(str, enum.Enum):
    STRING = "string"
    INT = "int"
    DOUBLE = "double"
    BOOL = "bool"

    @property
    def numeric(self) -> bool:
        return self in (FieldType.INT, FieldType.DOUBLE)


DEFAULT_CHUNK_TOKENS = 200
DEFAULT_OVERLAP_TOKENS = 40
MAX_CHUNK_TOKENS = 512


@dataclass(frozen=True)
class CollectionSpec:
    name: str
    chunk_tokens: int
    overlap_tokens: int
    fields: dict[str, FieldType]
    create_time: datetime

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "chunk_tokens": self.chunk_tokens,
            "overlap_tokens": self.overlap_tokens,
            "fields": {k: v.value for k, v in self.fields.items()},
            "create_time": self.create_time.isoformat(),
        }

    @classmethod
    def from_json(cls, data: dict) -> "CollectionSpec":
        return cls(
            name=data["name"],
            chunk_tokens=int(data["chunk_tokens"]),
            overlap_tokens=int(data["overlap_tokens"]),
            fields={k: FieldType(v) for k, v in data["fields"].items()},
            create_time=datetime.fromisoformat(data["create_time"]),
        )


@dataclass(frozen=True)
class DocumentInput:
    id: str
    text: str
    metadata: dict[str, Scalar]


@dataclass(frozen=True)
class Chunk:
    """One stored chunk: what a backend writes for a document (all chunks of a document share content_hash)."""

    document_id: str
    chunk_index: int
    text: str
    vector: Sequence[float]  # a list, or a row of the batch's float32 matrix (no per-float Python objects)
    metadata: dict[str, Scalar]
    content_hash: str

    @property
    def chunk_id(self) -> str:
        return f"{self.document_id}#{self.chunk_index}"


def split_chunk_id(chunk_id: str) -> tuple[str, int]:
    """The document id and chunk index a `Chunk.chunk_id` was made of (a document id may hold '#' itself)."""
    document_id, _, index = chunk_id.rpartition("#")
    return document_id, int(index)


@dataclass(frozen=True)
class PreparedDocument:
    id: str
    content_hash: str
    chunks: list[Chunk]


@dataclass(frozen=True)
class Hit:
    chunk_id: str
    document_id: str
    chunk_index: int
    text: str
    metadata: dict[str, Scalar]
    score: float


# Filters: a validated tree that each backend translates into its own query language.
@dataclass(frozen=True)
class Equals:
    field: str
    value: Scalar


@dataclass(frozen=True)
class InList:
    field: str
    values: tuple[Scalar, ...]


@dataclass(frozen=True)
class Between:
    field: str
    gt: float | int | None = None  # ints for an int field, floats for a double field
    gte: float | int | None = None
    lt: float | int | None = None
    lte: float | int | None = None


@dataclass(frozen=True)
class AllOf:
    filters: tuple["Filter", ...]


@dataclass(frozen=True)
class AnyOf:
    filters: tuple["Filter", ...]


Filter = Union[Equals, InList, Between, AllOf, AnyOf]


class SearchMode(str, enum.Enum):
    VECTOR = "vector"
    KEYWORD = "keyword"
    HYBRID = "hybrid"


@dataclass(frozen=True)
class SearchQuery:
    collection: str
    text: str
    mode: SearchMode
    top_k: int
    alpha: float
    filter: Filter | None = None
    vector: list[float] | None = field(default=None, compare=False)


# A search's query vector, or a function that computes it when the store needs it (the embedded store starts
# a hybrid search's keyword side first, so it runs while the query is embedded).
QueryVector = Union[Sequence[float], Callable[[], Sequence[float]], None]


def resolve_vector(vector: QueryVector) -> Sequence[float] | None:
    return vector() if callable(vector) else vector
