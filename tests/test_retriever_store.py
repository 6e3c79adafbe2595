"""The embedded LanceDB store on its own: data survives a restart of the service, and large collections
get an approximate vector index that still finds the nearest chunks."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import grpc
import numpy as np
import pytest

from services.retriever.backends.lancedb.store import LanceDBStore
from services.retriever.domain import Between, Chunk, CollectionSpec, FieldType, PreparedDocument
from services.retriever.server import RetrieverService
from services.retriever.settings import RetrieverSettings
from tests.grpc_support import InProcessServer
from tests.retriever_support import Client, R, doc, plain

pytestmark = pytest.mark.timeout(300)


def test_data_survives_a_restart(tmp_path):
    settings = RetrieverSettings(port=0, backend="lancedb", data_dir=tmp_path, grace_period_s=1)
    with InProcessServer(RetrieverService, settings, "retriever") as first, grpc.insecure_channel(first.address) as ch:
        acme = Client(ch, "acme")
        acme.create("kb", fields=[R.MetadataField(name="year", type=R.METADATA_TYPE_INT)])
        acme.upsert("kb", doc("d1", "The lighthouse keeper polished the great lens.", year=1890),
                    doc("d2", "Tax forms are due in April.", year=2024))
        before = acme.search("kb", "who tends the lamp on the coast?", mode=R.SEARCH_MODE_VECTOR)
    with InProcessServer(RetrieverService, settings, "retriever") as second, grpc.insecure_channel(second.address) as ch:
        acme = Client(ch, "acme")
        assert [c.name for c in acme.ListCollections(R.ListCollectionsRequest()).collections] == ["kb"]
        assert acme.stats("kb") == (2, 2)
        after = acme.search("kb", "who tends the lamp on the coast?", mode=R.SEARCH_MODE_VECTOR)
        assert [(h.chunk_id, round(h.score, 4)) for h in after] == [(h.chunk_id, round(h.score, 4)) for h in before]
        assert after[0].document_id == "d1" and plain(after[0].metadata) == {"year": 1890}
        # An unchanged re-upsert after the restart is still recognised.
        assert acme.upsert("kb", doc("d1", "The lighthouse keeper polished the great lens.", year=1890)).unchanged == 1


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _new_collection(tmp_path, name: str, dim: int, **store_options) -> tuple[LanceDBStore, CollectionSpec]:
    """A store on tmp_path holding one empty collection `name` (one INT field `n`) of tenant acme."""
    store = LanceDBStore(tmp_path, dim, **store_options)
    spec = CollectionSpec(name, 200, 40, {"n": FieldType.INT}, datetime.now(timezone.utc))
    store.create_collection("acme", spec)
    return store, spec


def test_large_collection_gets_an_index_that_finds_the_nearest(tmp_path):
    rng = np.random.default_rng(7)
    dim, n = 32, 1200
    vectors = _unit(rng.standard_normal((n, dim)).astype(np.float32))
    store, spec = _new_collection(tmp_path, "big", dim, ann_min_chunks=1000, index_nice=0)
    try:
        for start in range(0, n, 400):  # three commits; the index appears once the threshold is crossed
            docs = [
                PreparedDocument(f"d{i}", "h", [Chunk(f"d{i}", 0, f"text {i}", vectors[i].tolist(), {"n": i}, "h")])
                for i in range(start, start + 400)
            ]
            store.replace_documents("acme", spec, docs)
            store.wait_for_maintenance()
            indexed = "IvfHnswSq" in store.index_types("acme", "big")
            assert indexed == (start + 400 >= 1000)
        queries = _unit(vectors[:20] + 0.05 * rng.standard_normal((20, dim)).astype(np.float32))
        found = 0
        for q_index, q in enumerate(queries):
            exact = set(np.argsort(-(vectors @ q))[:10])
            hits = store.search("acme", spec, mode="vector", text="", vector=q.tolist(), top_k=10, alpha=1.0, filter=None)
            found += len(exact & {int(h.document_id[1:]) for h in hits})
            assert hits[0].document_id == f"d{q_index}"
        assert found / (10 * len(queries)) >= 0.9
        filtered = store.search("acme", spec, mode="vector", text="", vector=queries[0].tolist(), top_k=5, alpha=1.0,
                                filter=Between("n", gte=600))
        assert len(filtered) == 5 and all(h.metadata["n"] >= 600 for h in filtered)
        assert store.stats("acme", spec) == (n, n)
        chunk_ids, matrix = store.vectors("acme", "big")
        order = [int(c[1:].split("#")[0]) for c in chunk_ids]
        assert sorted(order) == list(range(n))
        assert np.allclose(matrix, vectors[order], atol=1e-6)
    finally:
        store.close()


def test_hits_carry_document_ids_with_hashes_and_chunk_indexes_whole(tmp_path):
    """Hits take their document id and chunk index from the chunk id (`document_id#index`), in every mode."""
    store = LanceDBStore(tmp_path, 4, auto_index=False)
    spec = store.create_collection("acme", CollectionSpec("kb", 200, 40, {}, datetime.now(timezone.utc)))
    chunks = [Chunk("faq#2024#q7", i, f"lighthouse part {i}", [1.0, float(i), 0.0, 0.0], {}, "h") for i in range(12)]
    store.replace_documents("acme", spec, [PreparedDocument("faq#2024#q7", "h", chunks)])
    for mode in ("vector", "keyword", "hybrid"):
        hits = store.search("acme", spec, mode=mode, text="lighthouse part 11", vector=[1.0, 11.0, 0.0, 0.0],
                            top_k=3, alpha=0.5, filter=None)
        assert hits[0].chunk_id == "faq#2024#q7#11", mode
        assert (hits[0].document_id, hits[0].chunk_index, hits[0].text) == ("faq#2024#q7", 11, "lighthouse part 11"), mode
        assert all(h.chunk_id == f"{h.document_id}#{h.chunk_index}" for h in hits), mode
    store.close()


def _docs(vectors: np.ndarray, start: int) -> list[PreparedDocument]:
    return [
        PreparedDocument(f"d{i}", "h", [Chunk(f"d{i}", 0, f"text {i}", vectors[i - start], {"n": i}, "h")])
        for i in range(start, start + len(vectors))
    ]


def _append_random(store, spec, rng, rows: dict, count: int, dim: int) -> None:
    """Writes `count` documents with random unit vectors after those in `rows`, which records them."""
    start = len(rows)
    vectors = _unit(rng.standard_normal((count, dim)).astype(np.float32))
    rows.update({f"d{start + i}": vectors[i] for i in range(count)})
    store.replace_documents("acme", spec, _docs(vectors, start))


def test_writes_and_searches_proceed_while_the_index_is_rebuilt(tmp_path):
    """A forced rebuild runs in the background; writes commit and their rows are found by search (exactly,
    as unindexed rows) before it finishes; afterwards the new index serves them too."""
    import time

    from services.retriever.backends.lancedb.index import Action

    rng = np.random.default_rng(3)
    dim = 64
    # Bulk-loaded without automatic maintenance, then one forced (re)build: the job the writes overlap.
    store, spec = _new_collection(tmp_path, "big", dim, ann_min_chunks=1000, ann_rows_per_partition=1000,
                                  auto_index=False, index_nice=0)
    try:
        store.replace_documents("acme", spec, _docs(_unit(rng.standard_normal((3000, dim)).astype(np.float32)), 0))
        store.maintain_index("acme", "big", rebuild=True)
        deadline = time.monotonic() + 60
        while store.indexer.running is None and time.monotonic() < deadline:
            time.sleep(0.005)
        job = store.indexer.running
        assert job is not None and job.action is Action.BUILD
        written, searched, next_id = [], [], 3000
        while store.indexer.running is job and next_id < 3000 + 20 * 50:
            fresh = _unit(rng.standard_normal((20, dim)).astype(np.float32))
            store.replace_documents("acme", spec, _docs(fresh, next_id))
            written.append(time.time())
            hits = store.search("acme", spec, mode="vector", text="", vector=fresh[0].tolist(), top_k=1, alpha=1.0,
                                filter=None)
            assert hits[0].document_id == f"d{next_id}"  # a row written during the rebuild is found at once
            searched.append(time.time())
            next_id += 20
        assert store.wait_for_maintenance(120)
        assert job.error is None and job.finished is not None
        # Robust on a loaded machine: what matters is that they completed before the rebuild did, not how fast.
        assert sum(t < job.finished for t in written) >= 3, (len(written), job.finished - job.started)
        assert sum(t < job.finished for t in searched) >= 3
        assert store.stats("acme", spec) == (next_id, next_id)
        status = store.index_status("acme", "big")
        assert status["vector_partitions"] == 3 and status["running"] is None
        chunk_ids, matrix = store.vectors("acme", "big")
        row = dict(zip(chunk_ids, matrix))  # old and new rows, through the rebuilt index
        for i in (0, 2999, next_id - 1):
            hits = store.search("acme", spec, mode="vector", text="", vector=row[f"d{i}#0"].tolist(), top_k=1,
                                alpha=1.0, filter=None)
            assert hits[0].document_id == f"d{i}"
    finally:
        store.close()


def _word_docs(rng, dim: int, start: int, count: int) -> list[PreparedDocument]:
    words = ["harbor", "lantern", "copper", "orchard", "glacier", "violin", "meadow", "falcon"]
    vectors = _unit(rng.standard_normal((count, dim)).astype(np.float32))
    return [
        PreparedDocument(f"d{i}", "h", [Chunk(f"d{i}", 0, f"{words[i % 8]} {words[(i * 3) % 8]} note {i}",
                                              vectors[i - start].tolist(), {"n": i}, "h")])
        for i in range(start, start + count)
    ]


def test_hybrid_reads_only_the_fused_rows_and_answers_the_same(tmp_path):
    """Hybrid fuses row-id candidates and reads text and metadata for the top k only: the same hits, scores
    and metadata as fusing whole rows, with filters and at every alpha; and when the row ids went stale
    between the two reads (a compaction rewrote the fragments), it answers from whole rows instead."""
    from services.retriever.backends.lancedb.sql import where_clause
    from services.retriever.domain import Equals

    rng = np.random.default_rng(11)
    dim = 16
    store, spec = _new_collection(tmp_path, "mix", dim, auto_index=False, hybrid_candidates=20)
    try:
        for start in range(0, 300, 100):  # three fragments, so a compaction has something to rewrite
            store.replace_documents("acme", spec, _word_docs(rng, dim, start, 100))
        table = store._table("acme", "mix")
        queries = _unit(rng.standard_normal((6, dim)).astype(np.float32))
        cases = [(q.tolist(), text, alpha, flt) for q, text in zip(queries, ["lantern", "copper orchard", "falcon note"] * 2)
                 for alpha, flt in ((0.5, None), (0.25, Between("n", gte=150)), (1.0, None), (0.0, Equals("n", 42)))]
        answered = 0
        for vector, text, alpha, flt in cases:
            fused = store.search("acme", spec, mode="hybrid", text=text, vector=vector, top_k=7, alpha=alpha, filter=flt)
            direct = store._search.hybrid_direct(table, spec, text=text, vector=vector, top_k=7, alpha=alpha,
                                                 where=None if flt is None else where_clause(flt), nprobes=8)
            assert [(h.chunk_id, h.text, h.metadata, round(h.score, 6)) for h in fused] == \
                   [(h.chunk_id, h.text, h.metadata, round(h.score, 6)) for h in direct], (text, alpha, flt)
            allowed = {None: lambda n: True, Between: lambda n: n >= 150, Equals: lambda n: n == 42}[type(flt) if flt else None]
            assert all(allowed(h.metadata["n"]) for h in fused)
            answered += len(fused) == 7
        assert answered >= len(cases) // 2

        # The query vector may come as a function (the service embeds when the store asks): called once, and
        # not at all when hybrid's alpha leaves out the vector side.
        calls = []

        def embed_query():
            calls.append(1)
            return queries[0].tolist()

        lazy = store.search("acme", spec, mode="hybrid", text="lantern", vector=embed_query, top_k=7, alpha=0.5,
                            filter=None)
        eager = store.search("acme", spec, mode="hybrid", text="lantern", vector=queries[0].tolist(), top_k=7,
                             alpha=0.5, filter=None)
        assert [h.chunk_id for h in lazy] == [h.chunk_id for h in eager] and len(calls) == 1
        store.search("acme", spec, mode="hybrid", text="lantern", vector=embed_query, top_k=7, alpha=0.0, filter=None)
        assert len(calls) == 1

        # Stale row ids: a commit lands between the vector side's version and the keyword side's query. The
        # first try meets a compaction (row ids renumbered), the second a delete; the third answers whole.
        store.delete_documents("acme", spec, ["d1"])
        vector, text = queries[0].tolist(), "lantern"
        direct_calls = []
        direct = store._search.hybrid_direct
        store._search.hybrid_direct = lambda *a, **kw: direct_calls.append(kw) or direct(*a, **kw)

        class CommitsFirst:
            """The real table, changed by a real commit just before each of the first two keyword queries."""

            def __init__(self, inner):
                self._inner, self.commits = inner, 0

            def __getattr__(self, name):
                return getattr(self._inner, name)

            def search(self, *args, **kwargs):
                if kwargs.get("query_type") == "fts" and self.commits < 2:
                    if self.commits == 0:
                        self._inner.optimize()  # compacts the three fragments into one
                    else:
                        self._inner.delete("document_id = 'd2'")
                    self.commits += 1
                return self._inner.search(*args, **kwargs)

        changing = CommitsFirst(table)
        hits = store._search.hybrid(changing, spec, store._collection_vectors("acme", "mix"), text=text, vector=vector,
                                    top_k=7, alpha=0.5, where=None, nprobes=8)
        assert changing.commits == 2 and len(direct_calls) == 1  # two tries saw two versions: answered whole
        assert len(hits) == 7 and not {"d1#0", "d2#0"} & {h.chunk_id for h in hits}
        for h in hits:  # every hit's text and metadata are its own chunk's, not those of a renumbered row
            i = int(h.chunk_id[1:].split("#")[0])
            assert h.text.endswith(f" note {i}") and h.metadata == {"n": i}
        again = store.search("acme", spec, mode="hybrid", text=text, vector=vector, top_k=7, alpha=0.5, filter=None)
        assert [(h.chunk_id, round(h.score, 6)) for h in again] == [(h.chunk_id, round(h.score, 6)) for h in hits]
        assert len(direct_calls) == 1 and store.stats("acme", spec) == (298, 298)
    finally:
        store.close()


@pytest.mark.slow  # several index jobs in child processes: 15 to 28 s here
def test_folds_add_index_segments_merge_them_and_compact_small_fragments(tmp_path):
    """New rows are folded into each index as a segment, not by retraining it: the trained vector index stays,
    the segments of later folds are merged once there are four, and many small writes are compacted; every
    row stays findable and counted."""
    rng = np.random.default_rng(5)
    dim = 16
    store, spec = _new_collection(tmp_path, "grow", dim, ann_min_chunks=1000, index_nice=0, index_idle=True)
    rows = {}

    def write(count: int) -> None:
        _append_random(store, spec, rng, rows, count, dim)
        assert store.wait_for_maintenance(120)

    def segments() -> dict[str, int]:
        table = store._table("acme", "grow")
        table.checkout_latest()
        return {i.name: table.index_stats(i.name).num_indices for i in table.list_indices()}

    try:
        write(1200)  # crosses ann_min_chunks: the build
        build = store.indexer.history[-1]
        assert build.action.value == "build" and segments() == {"vector_idx": 1, "text_idx": 1, "document_id_idx": 1}
        assert build.result["idle"] is True  # the job ran in the SCHED_IDLE class (index_idle=True)
        for expected, merged in ((2, 0), (3, 0), (4, 0), (2, 3)):  # each write passes the 1,000-row fold threshold
            write(1001)
            job = store.indexer.history[-1]
            assert job.action.value == "optimize" and job.error is None, job
            assert segments()["vector_idx"] == expected and segments()["text_idx"] == expected
            assert job.result["folded"]["vector_idx"] == {"rows": 1001, "merged_segments": merged}
        assert [j.action.value for j in store.indexer.history].count("build") == 1  # never retrained
        status = store.index_status("acme", "grow")
        assert status["vector_unindexed"] == 0 and status["fts_unindexed"] == 0

        for _ in range(8):  # small writes, below the fold threshold: no job, one fragment each
            write(10)
        assert store.indexer.history[-1].result["compacted"] is None
        write(1001)
        compacted = store.indexer.history[-1].result["compacted"]
        assert compacted is not None and compacted["fragments_removed"] > compacted["fragments_added"] >= 1
        assert store.stats("acme", spec) == (len(rows), len(rows))
        for i in (0, 1199, 2500, len(rows) - 1001, len(rows) - 1):  # trained, folded, compacted: all found
            hits = store.search("acme", spec, mode="vector", text="", vector=rows[f"d{i}"].tolist(), top_k=1,
                                alpha=1.0, filter=None)
            assert hits[0].document_id == f"d{i}"
        assert store.search("acme", spec, mode="keyword", text=f"text {len(rows) - 1}", vector=None, top_k=1,
                            alpha=0.0, filter=None)[0].document_id == f"d{len(rows) - 1}"
    finally:
        store.close()


def test_rows_left_below_the_fold_thresholds_are_folded_once_the_collection_is_quiet(tmp_path):
    """An ingest that ends below the thresholds leaves rows unindexed; after `index_quiet_s` without writes
    they are folded (and only then: writes keep postponing it), every row still found."""
    rng = np.random.default_rng(9)
    dim = 16
    store, spec = _new_collection(tmp_path, "quiet", dim, ann_min_chunks=1000, index_nice=0, index_quiet_s=3.0)
    rows = {}
    try:
        _append_random(store, spec, rng, rows, 1200, dim)  # the build
        assert store.wait_for_maintenance(120) and store.indexer.history[-1].action.value == "build"
        jobs = len(store.indexer.history)
        for _ in range(3):  # small writes, each below the thresholds and inside the quiet period of the last
            _append_random(store, spec, rng, rows, 20, dim)
            assert store.wait_for_maintenance(60)
            time.sleep(0.5)
        status = store.index_status("acme", "quiet")
        assert len(store.indexer.history) == jobs and status["vector_unindexed"] == 60 and status["fts_unindexed"] == 60
        deadline = time.monotonic() + 60
        while store.index_status("acme", "quiet")["vector_unindexed"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert store.wait_for_maintenance(60)
        status = store.index_status("acme", "quiet")
        assert status["vector_unindexed"] == 0 and status["fts_unindexed"] == 0
        fold = store.indexer.history[-1]
        assert fold.action.value == "optimize" and "60 rows unindexed after 3 s without writes" in fold.reason
        assert fold.result["folded"]["vector_idx"]["rows"] == 60 and len(store.indexer.history) == jobs + 1
        assert store.stats("acme", spec) == (1260, 1260)
        last = f"d{len(rows) - 1}"
        hits = store.search("acme", spec, mode="vector", text="", vector=rows[last].tolist(), top_k=1, alpha=1.0,
                            filter=None)
        assert hits[0].document_id == last
    finally:
        store.close()


def test_a_fold_killed_mid_job_loses_no_row_and_the_next_fold_completes(tmp_path):
    """The index process is killed (SIGKILL) as soon as a fold starts: every row is still stored and found
    (unindexed rows are searched exactly), and a restarted store folds them all."""
    import time

    rng = np.random.default_rng(9)
    dim = 16
    store, spec = _new_collection(tmp_path, "kill", dim, ann_min_chunks=1000, index_nice=0)
    vectors = _unit(rng.standard_normal((2600, dim)).astype(np.float32))
    killed = 0
    try:
        store.replace_documents("acme", spec, _docs(vectors[:1200], 0))  # the build
        assert store.wait_for_maintenance(120)
        for start in range(8):  # small fragments, so the fold also compacts: more to interrupt
            store.replace_documents("acme", spec, _docs(vectors[1200 + 50 * start: 1250 + 50 * start], 1200 + 50 * start))
        store.replace_documents("acme", spec, _docs(vectors[1600:], 1600))  # past the fold threshold
        deadline = time.monotonic() + 60
        while killed == 0 and time.monotonic() < deadline:
            child = store.indexer._child
            if child is not None and child.poll() is None:
                child.kill()
                killed += 1
            time.sleep(0.001)
        assert killed == 1
        assert store.wait_for_maintenance(120)
    finally:
        store.close()

    reopened = LanceDBStore(tmp_path, dim, ann_min_chunks=1000, index_nice=0)
    try:
        assert reopened.stats("acme", spec) == (2600, 2600)  # nothing lost
        for i in (0, 1199, 1200, 1599, 1600, 2599):
            hits = reopened.search("acme", spec, mode="vector", text="", vector=vectors[i].tolist(), top_k=1, alpha=1.0,
                                   filter=None)
            assert hits[0].document_id == f"d{i}"
        reopened.maintain_index("acme", "kill")
        assert reopened.wait_for_maintenance(120)
        status = reopened.index_status("acme", "kill")
        assert status["vector_unindexed"] == 0 and status["fts_unindexed"] == 0
        assert reopened.stats("acme", spec) == (2600, 2600)
    finally:
        reopened.close()


def test_rows_appended_after_the_index_are_searched_exactly_beside_it(tmp_path):
    """While rows are only appended, vector search reads the index at the last version it covers whole and the
    appended fragments exactly: the same hits and scores as LanceDB's own plan. An update of an appended row is
    seen at once; a delete from an indexed fragment sends queries to LanceDB's plan until the next fold."""
    rng = np.random.default_rng(11)
    dim = 16
    store, spec = _new_collection(tmp_path, "app", dim, ann_min_chunks=1000, index_nice=0, auto_index=False)
    rows = {}

    def write(count: int) -> None:
        _append_random(store, spec, rng, rows, count, dim)

    def same_as_lance(queries: np.ndarray) -> None:
        table = store._table("acme", "app")
        for q in queries:
            ours = store.search("acme", spec, mode="vector", text="", vector=q.tolist(), top_k=10, alpha=1.0, filter=None)
            theirs = store._search.vector_direct(table, spec, q.tolist(), 10, None, 8)
            assert [(h.chunk_id, h.text, h.metadata, round(h.score, 5)) for h in ours] == \
                   [(h.chunk_id, h.text, h.metadata, round(h.score, 5)) for h in theirs]
            hybrid = store.search("acme", spec, mode="hybrid", text="text", vector=q.tolist(), top_k=10, alpha=0.5,
                                  filter=None)
            direct = store._search.hybrid_direct(table, spec, text="text", vector=q.tolist(), top_k=10, alpha=0.5,
                                                 where=None, nprobes=8)
            # Every row's text contains "text": equal keyword scores, so only untied places have a fixed chunk.
            scores = [round(h.score, 5) for h in hybrid]
            assert scores == [round(h.score, 5) for h in direct]
            assert all(a.chunk_id == b.chunk_id for a, b, s in zip(hybrid, direct, scores) if scores.count(s) == 1)

    try:
        write(1200)
        store.maintain_index("acme", "app")
        assert store.wait_for_maintenance(120) and store.index_status("acme", "app")["vector_unindexed"] == 0
        plans = store._collection_vectors("acme", "app").plans
        same_as_lance(_unit(rng.standard_normal((5, dim)).astype(np.float32)))
        assert plans["indexed"] == 10 and plans["appended"] == plans["lance"] == 0

        for _ in range(3):  # three appends, three fragments the index does not cover
            write(50)
        assert store.index_status("acme", "app")["vector_unindexed"] == 150
        near_new = _unit(np.stack([rows[f"d{i}"] for i in range(1200, 1350, 10)]) + 0.01)
        same_as_lance(np.concatenate([near_new, _unit(rng.standard_normal((5, dim)).astype(np.float32))]))
        assert plans["appended"] == 40 and plans["lance"] == 0
        top = store.search("acme", spec, mode="vector", text="", vector=rows["d1340"].tolist(), top_k=1, alpha=1.0,
                           filter=None)
        assert top[0].chunk_id == "d1340#0" and top[0].score == pytest.approx(1.0, abs=1e-5)

        # An appended row updated: its old vector is gone at once, its new one found.
        moved = _unit(rng.standard_normal((1, dim)).astype(np.float32))[0]
        store.replace_documents("acme", spec, _docs(moved[None, :], 1340))
        old = store.search("acme", spec, mode="vector", text="", vector=rows["d1340"].tolist(), top_k=3, alpha=1.0,
                           filter=None)
        new = store.search("acme", spec, mode="vector", text="", vector=moved.tolist(), top_k=1, alpha=1.0, filter=None)
        assert all(h.score < 0.999 for h in old if h.chunk_id == "d1340#0")
        assert new[0].chunk_id == "d1340#0" and new[0].score == pytest.approx(1.0, abs=1e-5)
        assert plans["lance"] == 0

        # A delete from an indexed fragment: LanceDB's own plan, and the deleted row is never returned.
        store.delete_documents("acme", spec, ["d7"])
        gone = store.search("acme", spec, mode="vector", text="", vector=rows["d7"].tolist(), top_k=5, alpha=1.0,
                            filter=None)
        assert "d7#0" not in {h.chunk_id for h in gone} and len(gone) == 5 and plans["lance"] == 1
        # A filtered query always takes LanceDB's plan (its prefilter).
        filtered = store.search("acme", spec, mode="vector", text="", vector=rows["d1300"].tolist(), top_k=3,
                                alpha=1.0, filter=Between("n", gte=1300))
        assert filtered[0].chunk_id == "d1300#0" and all(h.metadata["n"] >= 1300 for h in filtered)

        # Eight small fragments, but some not indexed: no compaction (it would rewrite the indexed base).
        from services.retriever.backends.lancedb import builder

        for _ in range(5):
            write(5)
        job = {"index_name": "vector_idx", "compact_fragments": 8}
        assert builder._compact(store._table("acme", "app").to_lance(), job) is None

        store.maintain_index("acme", "app")  # the fold covers every fragment again, then compacts
        assert store.wait_for_maintenance(120) and store.index_status("acme", "app")["vector_unindexed"] == 0
        assert store.indexer.history[-1].result["compacted"]["fragments_removed"] >= 8
        before = dict(plans)
        same_as_lance(_unit(rng.standard_normal((3, dim)).astype(np.float32)))
        assert plans["indexed"] == before["indexed"] + 6 and plans["lance"] == before["lance"]
    finally:
        store.close()
