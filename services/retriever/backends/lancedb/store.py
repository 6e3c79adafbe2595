"""The embedded default store: one LanceDB database per tenant on local disk, one table per collection.

A document's chunks are written in one LanceDB commit (append, or merge-insert that also deletes the
document's old chunks), so a document lands whole or not at all and survives a restart. Vector search is
exact while a collection is small and uses an IVF_HNSW_SQ index once it is large; `index.py` keeps
the indexes fresh in a background process that no write or search ever waits on.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa

from ragtune.errors import AlreadyExists, NotFound
from services.retriever.backends.lancedb.index import Action, IndexMaintainer, IndexPolicy, IndexState
from services.retriever.backends.lancedb.search import DEFAULT_EF, TableSearch, nprobes_for
from services.retriever.backends.lancedb.sql import ids_clause, where_clause
from services.retriever.backends.lancedb.vector import CollectionVectors
from services.retriever.domain import CollectionSpec, FieldType, Hit, PreparedDocument, resolve_vector

log = logging.getLogger(__name__)

_ARROW_TYPES = {
    FieldType.STRING: pa.string(),
    FieldType.INT: pa.int64(),
    FieldType.DOUBLE: pa.float64(),
    FieldType.BOOL: pa.bool_(),
}
_VECTOR_INDEX = "vector_idx"
_FTS_INDEX = "text_idx"
_SPECS_DIR = "_collections"
_INDEX_DIR = "_indexes"  # the shape each collection's vector index was trained with
# How stale a table handle may be before it looks for commits made by the index process. Our own writes
# are always visible at once (a handle sees what it commits).
_READ_CONSISTENCY = timedelta(seconds=1)
_COMMIT_ATTEMPTS = 6


def _is_commit_conflict(exc: Exception) -> bool:
    return "commit conflict" in str(exc).lower() or "retryable" in str(exc).lower()


class LanceDBStore:
    """The VectorStore over LanceDB; blocking calls, safe from several threads (writes per collection serialise)."""

    def __init__(
        self,
        root: Path,
        dimension: int,
        *,
        ann_min_chunks: int = 10_000,
        ann_reindex_fraction: float = 0.05,
        ann_rows_per_partition: int = 500_000,
        hybrid_candidates: int = 100,
        ann_ef: int = DEFAULT_EF,
        auto_index: bool = True,
        index_nice: int = 10,
        index_idle: bool = False,
        index_quiet_s: float | None = 30.0,
    ):
        self._root = Path(root)
        self._root.mkdir(parents=True, exist_ok=True)
        self._dimension = dimension
        self._auto_index = auto_index  # False: only explicit `maintain_index` calls (bulk loads in benchmarks)
        self._index_nice, self._index_idle = index_nice, index_idle
        self._guard = threading.Lock()  # protects the dictionaries below
        self._dbs: dict[str, object] = {}
        self._tables: dict[tuple[str, str], object] = {}
        self._write_locks: dict[tuple[str, str], threading.Lock] = {}
        policy = IndexPolicy(
            min_rows=ann_min_chunks, rows_per_partition=ann_rows_per_partition, fold_fraction=ann_reindex_fraction,
            quiet_s=index_quiet_s,
        )
        self.indexer = IndexMaintainer(policy, self._index_state, self._job_args, self._job_done)
        self._hybrid_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="lancedb-hybrid")
        self._search = TableSearch(self._hybrid_pool, hybrid_candidates, ann_ef)
        self._ann_ef = ann_ef
        self._partitions: dict[tuple[str, str], int] = {}  # trained partitions per collection, for nprobes
        self._vectors: dict[tuple[str, str], CollectionVectors] = {}  # vector search per collection

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
                self._dbs[tenant] = lancedb.connect(
                    str(self._tenant_dir(tenant)), read_consistency_interval=_READ_CONSISTENCY
                )
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
                self._vectors.pop((tenant, name), None)
            self._partitions.pop((tenant, name), None)
            self.indexer.forget((tenant, name))
            self._index_meta_path(tenant, name).unlink(missing_ok=True)
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

    def _arrow(self, spec: CollectionSpec, documents: list[PreparedDocument]) -> pa.Table:
        """The documents' chunks as one Arrow table, built column by column (vectors as one float32 block)."""
        chunks = [c for d in documents for c in d.chunks]
        vectors = np.asarray([c.vector for c in chunks], dtype=np.float32).reshape(len(chunks), self._dimension)
        columns = {
            "chunk_id": pa.array([c.chunk_id for c in chunks], pa.string()),
            "document_id": pa.array([c.document_id for c in chunks], pa.string()),
            "chunk_index": pa.array([c.chunk_index for c in chunks], pa.int32()),
            "text": pa.array([c.text for c in chunks], pa.string()),
            "content_hash": pa.array([c.content_hash for c in chunks], pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), pa.float32()), self._dimension),
        }
        for name, kind in spec.fields.items():
            columns[f"m_{name}"] = pa.array([c.metadata.get(name) for c in chunks], _ARROW_TYPES[kind])
        return pa.Table.from_pydict(columns, schema=self._schema(spec))

    def _commit(self, write) -> None:
        """Runs one LanceDB commit, retrying when an index job committed a conflicting change meanwhile
        (a compaction that rewrote the fragments an update touches): the write is redone on the new version."""
        for attempt in range(_COMMIT_ATTEMPTS):
            try:
                return write()
            except (RuntimeError, OSError, ValueError) as exc:
                if not _is_commit_conflict(exc) or attempt == _COMMIT_ATTEMPTS - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))

    def replace_documents(self, tenant: str, spec: CollectionSpec, documents: list[PreparedDocument]) -> None:
        if not documents:
            return
        data = self._arrow(spec, documents)
        ids = [d.id for d in documents]
        with self._write_lock(tenant, spec.name):
            table = self._table(tenant, spec.name)

            def write():
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

            self._commit(write)
        self._schedule_maintenance(tenant, spec.name)

    def bulk_append(self, tenant: str, spec: CollectionSpec, documents: list[PreparedDocument]) -> None:
        """One append of documents known to be new (bulk loads, benchmarks): no existence check, so a repeated
        id would duplicate its chunks."""
        data = self._arrow(spec, documents)
        with self._write_lock(tenant, spec.name):
            table = self._table(tenant, spec.name)
            self._commit(lambda: table.add(data))
        self._schedule_maintenance(tenant, spec.name)

    def delete_documents(self, tenant: str, spec: CollectionSpec, document_ids: list[str]) -> list[str]:
        with self._write_lock(tenant, spec.name):
            table = self._table(tenant, spec.name)
            found = self._existing(table, document_ids)
            if found:
                self._commit(lambda: table.delete(ids_clause(sorted(found))))
        if found:
            self._schedule_maintenance(tenant, spec.name)
        return [d for d in document_ids if d in found]

    def stats(self, tenant: str, spec: CollectionSpec) -> tuple[int, int]:
        table = self._table(tenant, spec.name)
        return table.count_rows("chunk_index = 0"), table.count_rows()

    # ---- search (search.py) ----------------------------------------------------------------
    def _nprobes(self, tenant: str, name: str) -> int:
        """Partitions a query probes: a share of those the index was trained with (read once, kept fresh by jobs)."""
        key = (tenant, name)
        partitions = self._partitions.get(key)
        if partitions is None:
            try:
                partitions = int(json.loads(self._index_meta_path(tenant, name).read_text())["partitions"])
            except (FileNotFoundError, ValueError, KeyError):
                partitions = 0  # no index yet (search is exact), or built before the count was recorded
            self._partitions[key] = partitions
        return nprobes_for(partitions)

    def _collection_vectors(self, tenant: str, name: str) -> CollectionVectors:
        with self._guard:
            vectors = self._vectors.get((tenant, name))
            if vectors is None:
                uri = str(self._tenant_dir(tenant) / f"{name}.lance")
                vectors = self._vectors[(tenant, name)] = CollectionVectors(uri, _VECTOR_INDEX, self._dimension, self._ann_ef)
            return vectors

    def search(self, tenant, spec, *, mode, text, vector, top_k, alpha, filter) -> list[Hit]:
        table = self._table(tenant, spec.name)
        where = where_clause(filter) if filter is not None else None
        if mode == "keyword":
            return self._search.keyword(table, spec, text, top_k, where)
        nprobes = self._nprobes(tenant, spec.name)
        vectors = self._collection_vectors(tenant, spec.name)
        if mode == "vector":
            return self._search.vector(table, spec, vectors, resolve_vector(vector), top_k, where, nprobes)
        return self._search.hybrid(table, spec, vectors, text=text, vector=vector, top_k=top_k, alpha=alpha,
                                   where=where, nprobes=nprobes)

    # ---- index maintenance (see index.py for the policy) ---------------------------------
    def _index_meta_path(self, tenant: str, name: str) -> Path:
        return self._tenant_dir(tenant) / _INDEX_DIR / f"{name}.json"

    def _schedule_maintenance(self, tenant: str, name: str) -> None:
        if self._auto_index:
            self.indexer.schedule((tenant, name))

    def maintain_index(self, tenant: str, name: str, *, rebuild: bool = False) -> None:
        """Asks for index maintenance now (a forced rebuild with rebuild=True); returns at once."""
        self.indexer.schedule((tenant, name), rebuild=rebuild)

    def _index_state(self, key: tuple[str, str]) -> IndexState | None:
        tenant, name = key
        if not self._spec_path(tenant, name).exists():
            return None
        try:
            table = self._table(tenant, name)
            table.checkout_latest()  # the index process commits too; plan from the newest version
            rows = table.count_rows()
            names = {i.name for i in table.list_indices()}
            vector = table.index_stats(_VECTOR_INDEX) if _VECTOR_INDEX in names else None
            fts = table.index_stats(_FTS_INDEX) if _FTS_INDEX in names else None
        except NotFound:
            return None
        partitions = None
        if vector is not None:
            try:
                partitions = int(json.loads(self._index_meta_path(tenant, name).read_text())["partitions"])
            except (FileNotFoundError, ValueError, KeyError):
                # Built by an older version, which did not record it: assume the policy's shape.
                partitions = self.indexer.policy.partitions_for(vector.num_indexed_rows)
        return IndexState(
            rows=rows,
            vector_partitions=partitions,
            vector_unindexed=vector.num_unindexed_rows if vector else 0,
            fts_unindexed=fts.num_unindexed_rows if fts else rows,
        )

    def _job_args(self, key: tuple[str, str], action: Action, state: IndexState) -> dict:
        tenant, name = key
        return {
            "uri": str(self._tenant_dir(tenant)),
            "table": name,
            "index_name": _VECTOR_INDEX,
            "partitions": self.indexer.policy.partitions_for(state.rows),
            "nice": self._index_nice,
            "idle": self._index_idle,
            # A build also rebuilds the full-text index when most rows are missing from it (after a bulk load):
            # cheaper than folding them all in.
            "fts": state.fts_unindexed > max(self.indexer.policy.fold_min_rows, state.rows // 2),
        }

    def _job_done(self, key: tuple[str, str], action: Action, state: IndexState, result: dict) -> None:
        tenant, name = key
        if action is Action.BUILD and self._spec_path(tenant, name).exists():
            # Remember the trained shape: the drift rule compares it with what the size now calls for.
            meta = {"partitions": self.indexer.policy.partitions_for(state.rows), "rows": result.get("rows"),
                    "built_at": time.time(), "build_seconds": result.get("seconds")}
            path = self._index_meta_path(tenant, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "w") as out:
                json.dump(meta, out)
            os.replace(tmp, path)
            self._partitions[key] = meta["partitions"]
        with self._guard:
            table = self._tables.get(key)
            vectors = self._vectors.get(key)
        if table is not None:
            table.checkout_latest()  # searches see the new index now rather than after the consistency interval
        if vectors is not None:
            vectors.index_changed()

    def index_status(self, tenant: str, name: str) -> dict:
        """The collection's index state and the job running now, if any (benchmarks, tests, operators)."""
        state = self._index_state((tenant, name))
        running = self.indexer.running
        return {
            "rows": state.rows if state else 0,
            "vector_partitions": state.vector_partitions if state else None,
            "vector_unindexed": state.vector_unindexed if state else 0,
            "fts_unindexed": state.fts_unindexed if state else 0,
            "running": running.action.value if running is not None and running.key == (tenant, name) else None,
        }

    def index_types(self, tenant: str, name: str) -> list[str]:
        """The kinds of index the collection's table has now (for benchmarks and tests)."""
        return [i.index_type for i in self._table(tenant, name).list_indices()]

    def vectors(self, tenant: str, name: str) -> tuple[list[str], np.ndarray]:
        """Every chunk id with its vector (for measuring recall against exact search)."""
        data = self._table(tenant, name).to_arrow().select(["chunk_id", "vector"])
        matrix = data["vector"].combine_chunks().flatten().to_numpy().reshape(len(data), self._dimension)
        return data["chunk_id"].to_pylist(), np.asarray(matrix, dtype=np.float32)

    def wait_for_maintenance(self, timeout: float | None = None) -> bool:
        """Blocks until scheduled index work is done (benchmarks and tests that need the index built)."""
        return self.indexer.wait_idle(timeout)

    def close(self) -> None:
        self.indexer.close()
        self._hybrid_pool.shutdown(wait=True)
        with self._guard:
            for (tenant, name), vectors in self._vectors.items():
                if vectors.plans:  # how vector queries were answered (vector.py), for tuning
                    log.info("vector search plans for %s/%s: %s", tenant, name, dict(vectors.plans))
            self._vectors.clear()
            self._tables.clear()
            self._dbs.clear()
