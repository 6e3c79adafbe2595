"""Vector, keyword and hybrid queries over one LanceDB collection table (the embedded store's read path).

Vector hits come from the collection's `CollectionVectors` (vector.py: the index at the newest
version it covers, plus rows appended since), at the version the table handle sees; keyword hits from
LanceDB's full-text search on the handle.

Hybrid search fuses the top `candidates` of each side. Reading a candidate's columns costs more than finding
it (at 1M rows, 100 vector candidates: 20.4 ms with their chunk ids, 12.2 ms as row ids; 100 keyword
candidates: 11.8 against 7.3), and fusion keeps only top_k of up to 200. So both sides return row ids only,
fusion keys on them, and only the fused top_k rows are read, at the vector side's version (1 ms for 10).
A row id names a row of one version of the table: when the keyword query ran on a newer version than the
vector side (the handle picked up a commit, e.g. an index job's compaction, in between), the query is answered
again the direct way (every candidate with its columns, fused by chunk id).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from operator import attrgetter

from services.retriever.domain import CollectionSpec, Hit, resolve_vector, split_chunk_id
from services.retriever.ranking import relative_score_fusion

# A hit's document id and chunk index are read from its chunk id: reading 10 rows by id at 1M took 0.8 ms for
# chunk_id and text, 3.1 ms more for document_id and chunk_index (lance decodes a whole block of such small
# values to take one).
BASE_COLUMNS = ["chunk_id", "text"]
# Query settings (bench/retriever_scale.py): IVF partitions of ~500k rows, each an HNSW graph over 8-bit
# scalar-quantised vectors. With many small partitions recall was bounded by the partitions probed (1M rows in
# 20 partitions: 8 probes gave recall@10 0.883, 16 gave 0.988), so a query probes 80% of them (at least 8, so
# small indexes, and the default two of 1M rows, are searched whole). Within a graph the search list `ef`
# (RAGTUNE_RETRIEVER_ANN_EF, default DEFAULT_EF) decides it: at 1M rows in 2 partitions, float32 query
# vectors, ef 150 / 200 / 250 / 300 / 400 gave recall@10 0.952 / 0.968 / 0.978 / 0.984 / 0.988 at 6.0 / 7.2 /
# 7.5 / 8.5 / 10.1 ms p50 in process. Re-ranking twice the hits on full vectors is what makes the distances
# exact (they merge with the exact search of appended rows); 5x made no difference.
MIN_NPROBES = 8
NPROBE_FRACTION = 0.8
DEFAULT_EF = 250
REFINE_FACTOR = 2


def nprobes_for(partitions: int) -> int:
    """Partitions a query probes, of those the index was trained with (0: no index, search is exact)."""
    return max(MIN_NPROBES, math.ceil(NPROBE_FRACTION * partitions))


@dataclass(frozen=True)
class Candidate:
    """One side's hybrid candidate: enough to fuse, and to read the row afterwards."""

    chunk_id: str
    row_id: int
    score: float


class TableSearch:
    """Runs queries on a table handle; `pool` runs hybrid's two sides at once (LanceDB releases the GIL, so
    the latency is the slower side, not the sum)."""

    def __init__(self, pool: ThreadPoolExecutor, hybrid_candidates: int, ef: int = DEFAULT_EF):
        self._pool = pool
        self._hybrid_candidates = hybrid_candidates
        self._ef = ef

    # ---- the two primitive queries --------------------------------------------------------------
    def _vector_query(self, table, vector, limit: int, where: str | None, nprobes: int):
        # With an index: probe the nearest partitions' HNSW graphs with a wide search list, then re-rank
        # twice the hits on full-precision vectors (SQ alone loses recall). Without an index (small
        # collections) LanceDB ignores all three and searches exactly.
        query = (
            table.search(vector, vector_column_name="vector")
            .distance_type("cosine")
            .nprobes(nprobes)
            .ef(max(self._ef, 2 * limit))
            .refine_factor(REFINE_FACTOR)
        )
        return (query.where(where, prefilter=True) if where else query).limit(limit)

    @staticmethod
    def _keyword_query(table, text: str, limit: int, where: str | None):
        from lancedb.query import MatchQuery

        query = table.search(MatchQuery(text, "text"), query_type="fts")
        return (query.where(where, prefilter=True) if where else query).limit(limit)

    # ---- whole hits -------------------------------------------------------------------------------
    @staticmethod
    def columns(spec: CollectionSpec) -> list[str]:
        return BASE_COLUMNS + [f"m_{k}" for k in spec.fields]

    @staticmethod
    def _hits(rows: list[dict], spec: CollectionSpec, score_of) -> list[Hit]:
        hits = []
        for r in rows:
            metadata = {k: r[f"m_{k}"] for k in spec.fields if r.get(f"m_{k}") is not None}
            document_id, chunk_index = split_chunk_id(r["chunk_id"])
            hits.append(Hit(r["chunk_id"], document_id, chunk_index, r["text"], metadata, score_of(r)))
        return hits

    def vector(self, table, spec, vectors, vector, limit: int, where: str | None, nprobes: int) -> list[Hit]:
        """`vectors` (the collection's CollectionVectors) finds the rows and reads them, both at the version
        `table` sees now."""
        version = table.version
        found = vectors.search(version, vector, limit, where, nprobes, chunk_ids=False)
        hits = self._read(vectors, version, spec, found)
        return hits if hits is not None else self.vector_direct(table, spec, vector, limit, where, nprobes)

    def vector_direct(self, table, spec, vector, limit: int, where: str | None, nprobes: int) -> list[Hit]:
        """LanceDB's own query, every hit read whole: one read of one version."""
        rows = self._vector_query(table, vector, limit, where, nprobes).select([*self.columns(spec), "_distance"]).to_list()
        return self._hits(rows, spec, lambda r: 1.0 - float(r["_distance"]))

    def _read(self, vectors, version: int, spec, found: list[Candidate]) -> list[Hit] | None:
        """The candidates' rows at `version` as hits, in order; None when a row id there is not its candidate's
        chunk (the keyword side's ids came from a newer version, after a compaction)."""
        if not found:
            return []
        try:
            rows = vectors.rows(version, [c.row_id for c in found], self.columns(spec))
        except OSError:  # lance: "rowaddr ... belongs to non-existent fragment"; the direct way re-reads all
            return None
        if len(rows) != len(found) or any(c.chunk_id and r["chunk_id"] != c.chunk_id for r, c in zip(rows, found)):
            return None
        scores = iter([c.score for c in found])
        return self._hits(rows, spec, lambda r: next(scores))

    def keyword(self, table, spec, text: str, limit: int, where: str | None) -> list[Hit]:
        rows = self._keyword_query(table, text, limit, where).select([*self.columns(spec), "_score"]).to_list()
        return self._hits(rows, spec, lambda r: float(r["_score"]))

    # ---- hybrid -------------------------------------------------------------------------------------
    def _both(self, vector_side, keyword_side, alpha: float) -> tuple[list, list]:
        if 0 < alpha < 1:
            keyword_future = self._pool.submit(keyword_side)
            vector_results = vector_side()
            return vector_results, keyword_future.result()
        return (vector_side() if alpha > 0 else []), (keyword_side() if alpha < 1 else [])

    def hybrid(self, table, spec, vectors, *, text, vector, top_k, alpha, where, nprobes) -> list[Hit]:
        """`vector` may be a function computing the query vector: it is called after the keyword side has
        started, so the two overlap (at 1M rows the keyword side takes 7 ms, the query embedding 9)."""
        limit = max(top_k, self._hybrid_candidates)
        embedded: list = []

        def query_vector():
            if not embedded:
                embedded.append(resolve_vector(vector))
            return embedded[0]

        for _ in range(2):  # an ingest commits about once a second: a second try nearly always sees one version
            version = table.version
            keyword_version: list[int] = []

            def vector_side(version=version) -> list[Candidate]:
                return vectors.search(version, query_vector(), limit, where, nprobes, chunk_ids=False)

            def keyword_side(seen=keyword_version) -> list[Candidate]:
                found = self._keyword_query(table, text, limit, where).select(["_score"]).with_row_id(True).to_list()
                seen.append(table.version)  # the handle's version only moves forward, with its queries
                return [Candidate("", r["_rowid"], float(r["_score"])) for r in found]

            sides = self._both(vector_side, keyword_side, alpha)
            if all(v == version for v in keyword_version):  # one version: row ids name the same rows
                hits = self._read(vectors, version, spec,
                                  relative_score_fusion(*sides, alpha, top_k, key=attrgetter("row_id")))
                if hits is not None:
                    return hits
        return self.hybrid_direct(table, spec, text=text, vector=query_vector() if alpha > 0 else None, top_k=top_k,
                                  alpha=alpha, where=where, nprobes=nprobes, vectors=vectors)

    def hybrid_direct(self, table, spec, *, text, vector, top_k, alpha, where, nprobes, vectors=None) -> list[Hit]:
        """Every candidate read whole (each side at one version of its own), then fused by chunk id: for when
        the two sides kept seeing different versions. Without `vectors`, the vector side is LanceDB's own query
        (tests compare with it)."""
        limit = max(top_k, self._hybrid_candidates)

        def vector_side() -> list[Hit]:
            if vectors is None:
                return self.vector_direct(table, spec, vector, limit, where, nprobes)
            return self.vector(table, spec, vectors, vector, limit, where, nprobes)

        return relative_score_fusion(
            *self._both(vector_side, lambda: self.keyword(table, spec, text, limit, where), alpha), alpha, top_k
        )
