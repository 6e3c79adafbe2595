"""The small interface every vector store backend implements; calls are blocking (the core runs them in threads)."""

from __future__ import annotations

from typing import Protocol

from services.retriever.domain import CollectionSpec, Filter, Hit, PreparedDocument, QueryVector


class VectorStore(Protocol):
    """Tenant-scoped storage of collections and chunks.

    Every method takes the tenant and must never touch another tenant's data. Methods on a
    collection raise `ragtune.errors.NotFound` when the tenant has no collection of that name.
    """

    def create_collection(self, tenant: str, spec: CollectionSpec) -> CollectionSpec:
        """Stores a new collection; AlreadyExists if the tenant has one of that name."""

    def get_collection(self, tenant: str, name: str) -> CollectionSpec: ...

    def list_collections(self, tenant: str) -> list[CollectionSpec]:
        """The tenant's collections, ordered by name."""

    def delete_collection(self, tenant: str, name: str) -> None: ...

    def content_hashes(self, tenant: str, spec: CollectionSpec, document_ids: list[str]) -> dict[str, str]:
        """The stored content hash of each of these documents that exists."""

    def replace_documents(self, tenant: str, spec: CollectionSpec, documents: list[PreparedDocument]) -> None:
        """Writes the documents' chunks, replacing every earlier chunk of those ids, all or nothing."""

    def delete_documents(self, tenant: str, spec: CollectionSpec, document_ids: list[str]) -> list[str]:
        """Deletes the documents' chunks; returns the ids that existed."""

    def search(
        self,
        tenant: str,
        spec: CollectionSpec,
        *,
        mode: str,
        text: str,
        vector: QueryVector,
        top_k: int,
        alpha: float,
        filter: Filter | None,
    ) -> list[Hit]:
        """Best hits first; mode is "vector", "keyword" or "hybrid" (alpha: 1 pure vector, 0 pure keyword).
        `vector` may be a function computing it (`domain.resolve_vector`), called at most once, when needed."""

    def stats(self, tenant: str, spec: CollectionSpec) -> tuple[int, int]:
        """(documents, chunks) of the collection."""

    def close(self) -> None: ...
