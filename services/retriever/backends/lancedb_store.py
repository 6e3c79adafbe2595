"""The embedded default store: one LanceDB database per tenant on local disk, one table per collection.

A document's chunks are written in one LanceDB commit (append, or merge-insert that also deletes the
document's old chunks), so a document lands whole or not at all and survives a restart. Vector search is
exact while a collection is small and uses an IVF_HNSW_SQ index, built in the background, once it is large.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa

from ragtune.errors import AlreadyExists, NotFound
from services.retriever.backends.lancedb_sql import ids_clause, where_clause
from services.retriever.domain import CollectionSpec, FieldType, Hit, PreparedDocument
from services.retriever.ranking import relative_score_fusion

log = logging.getLogger(__name__)

_ARROW_TYPES = {
    FieldType.STRING: pa.string(),
    FieldType.INT: pa.int64(),
    FieldType.DOUBLE: pa.float64(),
    FieldType.BOOL: pa.bool_(),
}
_BASE_COLUMNS = ["chunk_id", "document_id", "chunk_index", "text"]
_VECTOR_INDEX = "vector_idx"
_SPECS_DIR = "_collections"
# Vector index shape and query settings, measured for recall@10 >= 0.95 at p95 < 20 ms (bench/retriever_bench.py):
# IVF partitions of ~50k rows, each an HNSW graph over 8-bit scalar-quantised vectors.
_ROWS_PER_PARTITION = 50_000
_MAX_PARTITIONS = 256
_NPROBES = 8
_EF = 200
_REFINE_FACTOR = 2


class LanceDBStore:
    """The VectorStore over LanceDB; blocking calls, safe from several threads (writes per collection serialise)."""

    def __init__(
        self,
        root: Path,
        dimension: int,
        *,
        ann_min_chunks: int = 10_000,
        ann_reindex_fraction: float = 0.05,
        hybrid_candidates: int = 100,
    ):
        self._root = Path(root)
        self._root.mkdir(parents=True, exist_ok=True)
        self._dimension = dimension
        self._ann_min_chunks = ann_min_chunks
        self._ann_reindex_fraction = ann_reindex_fraction
        self._hybrid_candidates = hybrid_candidates
        self._guard = threading.Lock()  # protects the dictionaries below
        self._dbs: dict[str, object] = {}
        self._tables: dict[tuple[str, str], object] = {}
        self._write_locks: dict[tuple[str, str], threading.Lock] = {}
        self._maintenance = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lancedb-index")
        self._pending: dict[tuple[str, str], Future] = {}
        self._built_rows: dict[tuple[str, str], int] = {}  # rows when each vector index was trained

    # ---- layout -------------------------------------------------------------------------------
    def _tenant_dir(self, tenant: str) -> Path:
        return self._root / tenant

    def _spec_path(self, tenant: str, name: str) -> Path:
        return self._tenant_dir(tenant) / _SPECS_DIR / f"{name}.json"

    def _db(self, tenant: str):
        import lancedb

        with self._guard:
            if tenant not in self._dbs:
                self._tenant_dir(tenant).mkdir(parents=True, exist_ok=True)
                self._dbs[tenant] = lancedb.connect(str(self._tenant_dir(tenant)))
            return self._dbs[tenant]

    def _write_lock(self, tenant: str, name: str) -> threading.Lock:
        with self._guard:
            return self._write_locks.setdefault((tenant, name), threading.Lock())

    def _table(self, tenant: str, name: str):
        key = (tenant, name)
        with self._guard:
            table = self._tables.get(key)
        if table is None:
            try:
                table = self._db(tenant).open_table(name)
            except (FileNotFoundError, ValueError) as exc:
                raise NotFound(f"collection {name!r} not found") from exc
            with self._guard:
                table = self._tables.setdefault(key, table)
        return table

    def _schema(self, spec: CollectionSpec) -> pa.Schema:
        fields = [
            pa.field("chunk_id", pa.string(), nullable=False),
            pa.field("document_id", pa.string(), nullable=False),
            pa.field("chunk_index", pa.int32(), nullable=False),
            pa.field("text", pa.string(), nullable=False),
            pa.field("content_hash", pa.string(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), self._dimension), nullable=False),
        ]
        fields += [pa.field(f"m_{name}", _ARROW_TYPES[kind]) for name, kind in spec.fields.items()]
        return pa.schema(fields)

    # ---- collections --------------------------------------------------------------------------
    def create_collection(self, tenant: str, spec: CollectionSpec) -> CollectionSpec:
        with self._write_lock(tenant, spec.name):
            path = self._spec_path(tenant, spec.name)
            if path.exists():
                raise AlreadyExists(f"collection {spec.name!r} already exists")
            db = self._db(tenant)
            # A table left by an interrupted delete has no spec file: it is garbage and gets replaced.
            table = db.create_table(spec.name, schema=self._schema(spec), mode="overwrite")
            table.create_fts_index("text", use_tantivy=False, replace=True)
            # The spec file is written last, atomically: the collection exists exactly when it does.
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "w") as out:
                json.dump(spec.to_json(), out)
            os.replace(tmp, path)
            with self._guard:
                self._tables[(tenant, spec.name)] = table
        return spec

    def get_collection(self, tenant: str, name: str) -> CollectionSpec:
        try:
            return CollectionSpec.from_json(json.loads(self._spec_path(tenant, name).read_text()))
        except FileNotFoundError:
            raise NotFound(f"collection {name!r} not found") from None

    def list_collections(self, tenant: str) -> list[CollectionSpec]:
        folder = self._tenant_dir(tenant) / _SPECS_DIR
        if not folder.is_dir():
            return []
        names = sorted(p.stem for p in folder.glob("*.json"))
        specs = []
        for name in names:
            try:
                specs.append(self.get_collection(tenant, name))
            except NotFound:
                continue  # deleted meanwhile
        return specs

    def delete_collection(self, tenant: str, name: str) -> None:
        with self._write_lock(tenant, name):
            path = self._spec_path(tenant, name)
            if not path.exists():
                raise NotFound(f"collection {name!r} not found")
            path.unlink()
            with self._guard:
                self._tables.pop((tenant, name), None)
                pending = self._pending.pop((tenant, name), None)
            if pending is not None:
                pending.cancel()
            try:
                self._db(tenant).drop_table(name)
            except (FileNotFoundError, ValueError):
                shutil.rmtree(self._tenant_dir(tenant) / f"{name}.lance", ignore_errors=True)

    # ---- documents ----------------------------------------------------------------------------
    def _existing(self, table, document_ids: list[str]) -> dict[str, str]:
        if not document_ids:
            return {}
        rows = (
            table.search()
            .where(f"chunk_index = 0 AND {ids_clause(document_ids)}")
            .select(["document_id", "content_hash"])
            .limit(len(document_ids))
            .to_list()
        )
        return {r["document_id"]: r["content_hash"] for r in rows}

    def content_hashes(self, tenant: str, spec: CollectionSpec, document_ids: list[str]) -> dict[str, str]:
        return self._existing(self._table(tenant, spec.name), document_ids)

    def replace_documents(self, tenant: str, spec: CollectionSpec, documents: list[PreparedDocument]) -> None:
        if not documents:
            return
        schema = self._schema(spec)
        rows = []
        for doc in documents:
            for chunk in doc.chunks:
                row = {
                    "chunk_id": chunk.chunk_id,
                    "document_id": chunk.document_id,
                    "chunk_index": chunk.chunk_index,
                    "text": chunk.text,
                    "content_hash": chunk.content_hash,
                    "vector": chunk.vector,
                }
                row.update({f"m_{k}": v for k, v in chunk.metadata.items()})
                rows.append(row)
        data = pa.Table.from_pylist(rows, schema=schema)
        ids = [d.id for d in documents]
        with self._write_lock(tenant, spec.name):
            table = self._table(tenant, spec.name)
            if not self._existing(table, ids):
                table.add(data)  # all new: one append commit
            else:
                # One commit: upsert the new chunks and delete the documents' chunks that are not among them.
                (
                    table.merge_insert("chunk_id")
                    .when_matched_update_all()
                    .when_not_matched_insert_all()
                    .when_not_matched_by_source_delete(ids_clause(ids))
                    .execute(data)
                )
        self._schedule_maintenance(tenant, spec.name)

    def delete_documents(self, tenant: str, spec: CollectionSpec, document_ids: list[str]) -> list[str]:
        with self._write_lock(tenant, spec.name):
            table = self._table(tenant, spec.name)
            found = self._existing(table, document_ids)
            if found:
                table.delete(ids_clause(sorted(found)))
        return [d for d in document_ids if d in found]

    def stats(self, tenant: str, spec: CollectionSpec) -> tuple[int, int]:
        table = self._table(tenant, spec.name)
        return table.count_rows("chunk_index = 0"), table.count_rows()

    # ---- search -------------------------------------------------------------------------------
    def _hits(self, rows: list[dict], spec: CollectionSpec, score_of) -> list[Hit]:
        hits = []
        for r in rows:
            metadata = {k: r[f"m_{k}"] for k in spec.fields if r.get(f"m_{k}") is not None}
            hits.append(Hit(r["chunk_id"], r["document_id"], r["chunk_index"], r["text"], metadata, score_of(r)))
        return hits

    def _columns(self, spec: CollectionSpec) -> list[str]:
        return _BASE_COLUMNS + [f"m_{k}" for k in spec.fields]

    def _vector_search(self, table, spec, vector, limit: int, where: str | None) -> list[Hit]:
        # With an index: probe the nearest partitions' HNSW graphs with a wide search list, then re-rank
        # twice the hits on full-precision vectors (SQ alone loses recall). Without an index (small
        # collections) LanceDB ignores all three and searches exactly.
        query = (
            table.search(vector, vector_column_name="vector")
            .distance_type("cosine")
            .nprobes(_NPROBES)
            .ef(max(_EF, 2 * limit))
            .refine_factor(_REFINE_FACTOR)
        )
        if where:
            query = query.where(where, prefilter=True)
        rows = query.select([*self._columns(spec), "_distance"]).limit(limit).to_list()
        return self._hits(rows, spec, lambda r: 1.0 - float(r["_distance"]))

    def _keyword_search(self, table, spec, text: str, limit: int, where: str | None) -> list[Hit]:
        from lancedb.query import MatchQuery

        query = table.search(MatchQuery(text, "text"), query_type="fts")
        if where:
            query = query.where(where, prefilter=True)
        rows = query.select([*self._columns(spec), "_score"]).limit(limit).to_list()
        return self._hits(rows, spec, lambda r: float(r["_score"]))

    def search(self, tenant, spec, *, mode, text, vector, top_k, alpha, filter) -> list[Hit]:
        table = self._table(tenant, spec.name)
        where = where_clause(filter) if filter is not None else None
        if mode == "vector":
            return self._vector_search(table, spec, vector, top_k, where)
        if mode == "keyword":
            return self._keyword_search(table, spec, text, top_k, where)
        limit = max(top_k, self._hybrid_candidates)
        vector_hits = self._vector_search(table, spec, vector, limit, where) if alpha > 0 else []
        keyword_hits = self._keyword_search(table, spec, text, limit, where) if alpha < 1 else []
        return relative_score_fusion(vector_hits, keyword_hits, alpha, top_k)

    # ---- index maintenance --------------------------------------------------------------------
    def _schedule_maintenance(self, tenant: str, name: str) -> None:
        key = (tenant, name)
        with self._guard:
            if key in self._pending and not self._pending[key].done():
                return
            self._pending[key] = self._maintenance.submit(self._maintain, tenant, name)

    def _maintain(self, tenant: str, name: str) -> None:
        """Builds the vector index once a collection is large and folds rows added since into it and into
        the full-text index. Runs off the request path; until it is done, new rows are searched exactly."""
        try:
            with self._write_lock(tenant, name):
                table = self._table(tenant, name)
                rows = table.count_rows()
                self._refresh_fts(table)
                if rows < self._ann_min_chunks:
                    return
                if self._has_index(table, _VECTOR_INDEX):
                    stats = table.index_stats(_VECTOR_INDEX)
                    built = self._built_rows.get((tenant, name)) or stats.num_indexed_rows
                    if rows < 2 * built:
                        if stats.num_unindexed_rows > self._ann_reindex_fraction * rows:
                            table.optimize()  # new rows join the trained partitions
                        return
                    # Doubled since it was trained: retrain, so partitions stay ~50k rows. Geometric
                    # growth keeps the total build work linear in the collection size.
                partitions = min(_MAX_PARTITIONS, max(1, rows // _ROWS_PER_PARTITION))
                log.info("building vector index", extra={"fields": {"tenant": tenant, "collection": name, "rows": rows}})
                table.create_index(
                    metric="cosine",
                    vector_column_name="vector",
                    index_type="IVF_HNSW_SQ",
                    num_partitions=partitions,
                    replace=True,
                    name=_VECTOR_INDEX,
                )
                self._built_rows[(tenant, name)] = rows
        except NotFound:
            return  # the collection was deleted meanwhile
        except Exception:  # noqa: BLE001 - maintenance must never take the service down; search stays exact
            log.exception("index maintenance failed for %s/%s", tenant, name)

    def _has_index(self, table, name: str) -> bool:
        return any(i.name == name for i in table.list_indices())

    def _refresh_fts(self, table) -> None:
        stats = table.index_stats("text_idx") if self._has_index(table, "text_idx") else None
        if stats is None:
            table.create_fts_index("text", use_tantivy=False, replace=True)
        elif stats.num_unindexed_rows > max(1000, self._ann_reindex_fraction * table.count_rows()):
            table.optimize()

    def index_types(self, tenant: str, name: str) -> list[str]:
        """The kinds of index the collection's table has now (for benchmarks and tests)."""
        return [i.index_type for i in self._table(tenant, name).list_indices()]

    def vectors(self, tenant: str, name: str) -> tuple[list[str], np.ndarray]:
        """Every chunk id with its vector (for measuring recall against exact search)."""
        data = self._table(tenant, name).to_arrow().select(["chunk_id", "vector"])
        matrix = data["vector"].combine_chunks().flatten().to_numpy().reshape(len(data), self._dimension)
        return data["chunk_id"].to_pylist(), np.asarray(matrix, dtype=np.float32)

    def wait_for_maintenance(self) -> None:
        """Blocks until scheduled index work is done (benchmarks and tests that need the index built)."""
        with self._guard:
            pending = list(self._pending.values())
        for future in pending:
            future.result()

    def close(self) -> None:
        self._maintenance.shutdown(wait=True, cancel_futures=True)
        with self._guard:
            self._tables.clear()
            self._dbs.clear()
