"""Retriever at scale: vector, keyword and hybrid search over N chunks (default 1M) through the RPC, at rest and
while a 10k-document ingest runs; build time and memory.

Corpus: the wiki100 articles split into sentences and embedded with the real all-MiniLM-L6-v2 (about 29k
vectors, cached). Each of the N chunks is a mixture of three of those embeddings plus noise (spread like real
text, not uniform noise) whose text is the two heaviest sentences of its mixture (so BM25 has real text).
Queries are Jeopardy questions embedded by the service. The concurrent ingest streams the 10k Jeopardy clues
(one chunk each) into the same collection while the queries run.

Recall@10 is measured against exact references: numpy over every visible vector for vector search; LanceDB's
BM25 with a complete full-text index for keyword search; the same fusion of those two for hybrid search.
During the ingest, each query's reference covers the rows visible when it ran (the ingested documents
committed before it started, or before it ended: the better of the two), the keyword one restricted to them
by a filter (its BM25 statistics include the whole final collection, a tiny difference at 1M rows).

The built collection is kept under --cache (default ~/.cache/ragtune/bench/retriever-scale) with a manifest;
a later run with the same --vectors reuses it (it is restored to the built version first), so only the
first run pays for the build. The service runs as its own process (`python -m services.retriever`), so its
memory is its own and the benchmark's client does not share its GIL.

Run: nice -n 10 .venv/bin/python -m bench.retriever_scale [--vectors 1000000] [--queries 200] [--ingest-docs 10000]
Writes bench/results/retriever_scale_<N>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from bench.common import summary, write_result
from services.retriever.settings import RetrieverSettings

TENANT = "bench"
DIM = 384
MODES = ("vector", "keyword", "hybrid")


# ---- corpus -------------------------------------------------------------------------------------
def base_corpus(cache: Path) -> tuple[list[str], np.ndarray]:
    """wiki100 sentences and their real MiniLM embeddings (computed once, then read from the cache)."""
    texts_path, vectors_path = cache / "base.json", cache / "base.npy"
    if texts_path.exists() and vectors_path.exists():
        return json.loads(texts_path.read_text()), np.load(vectors_path)
    from sentence_transformers import SentenceTransformer

    from ragtune.models import embedding_model_path
    from clients.samples import wiki100_articles

    texts = []
    for _, text in wiki100_articles():
        for para in re.split(r"\n\s*\n", text):
            texts += [s[:600] for s in re.split(r"(?<=[.!?])\s+", para.strip()) if len(s) >= 40]
    model = SentenceTransformer(str(embedding_model_path()), device="cpu")
    vectors = model.encode(texts, batch_size=128, normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(vectors_path, vectors)
    texts_path.write_text(json.dumps(texts))
    return texts, vectors


def synthetic_block(texts: list[str], base: np.ndarray, start: int, size: int) -> tuple[list[str], np.ndarray]:
    """Rows start..start+size-1 of the synthetic corpus; deterministic per block, so it can be regenerated."""
    rng = np.random.default_rng(start)
    picks = rng.integers(0, len(base), size=(size, 3))
    weights = rng.dirichlet([1.0, 1.0, 1.0], size=size).astype(np.float32)
    mixed = np.einsum("nk,nkd->nd", weights, base[picks]) + 0.02 * rng.standard_normal((size, DIM)).astype(np.float32)
    mixed /= np.linalg.norm(mixed, axis=1, keepdims=True)
    order = np.argsort(-weights, axis=1)
    row_texts = [f"{texts[picks[i, order[i, 0]]]} {texts[picks[i, order[i, 1]]]}" for i in range(size)]
    return row_texts, mixed


def synthetic_vectors(texts: list[str], base: np.ndarray, n: int, block: int) -> np.ndarray:
    out = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, block):
        out[start : start + min(block, n - start)] = synthetic_block(texts, base, start, min(block, n - start))[1]
    return out


def ingest_documents(count: int) -> list[tuple[str, str]]:
    from clients.samples import jeopardy

    clues = jeopardy("10k")[:count]
    return [(f"ing{j}", f"{c['Category']}: {c['Question']} Answer: {c['Answer']}") for j, c in enumerate(clues)]


# ---- the built collection -----------------------------------------------------------------------
def _rss_mib(pid: int) -> dict:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return {"rss_mib": fields.get("VmRSS"), "peak_rss_mib": fields.get("VmHWM")}


def build_collection(args, cache: Path, texts: list[str], base: np.ndarray) -> dict:
    """Creates the N-chunk collection and its indexes, or reuses the cached one (restored to its built version)."""
    import lancedb

    from services.retriever.backends.lancedb.store import LanceDBStore
    from services.retriever.domain import Chunk, CollectionSpec, FieldType, PreparedDocument

    name = f"scale{args.vectors}"
    manifest_path = cache / f"{name}.json"
    store_dir = cache / "store"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
    if manifest and manifest.get("rows_per_partition") == args.rows_per_partition and not args.rebuild:
        try:
            table = lancedb.connect(str(store_dir / TENANT)).open_table(name)
            if table.version != manifest["version"]:
                table.checkout(manifest["version"])
                table.restore()  # drops what an earlier run's concurrent ingest added
            return {**manifest, "reused": True}
        except Exception as exc:  # noqa: BLE001 - any damage: build again
            print(f"cached collection unusable ({exc}); rebuilding", flush=True)
    shutil.rmtree(store_dir / TENANT / f"{name}.lance", ignore_errors=True)
    for stale in (store_dir / TENANT / "_collections" / f"{name}.json", store_dir / TENANT / "_indexes" / f"{name}.json"):
        stale.unlink(missing_ok=True)

    # One build at the end instead of one per doubling, partitioned as the service would partition it.
    store = LanceDBStore(store_dir, DIM, auto_index=False, ann_rows_per_partition=args.rows_per_partition)
    spec = CollectionSpec(name, 200, 40, {"seq": FieldType.INT}, datetime.now(timezone.utc))
    store.create_collection(TENANT, spec)
    write_s = 0.0
    try:
        for start in range(0, args.vectors, args.block):
            size = min(args.block, args.vectors - start)
            row_texts, vectors = synthetic_block(texts, base, start, size)
            docs = [PreparedDocument(f"s{start + i}", "h", [Chunk(f"s{start + i}", 0, row_texts[i], vectors[i], {}, "h")])
                    for i in range(size)]
            began = time.perf_counter()
            store.bulk_append(TENANT, spec, docs)
            write_s += time.perf_counter() - began
            print(f"wrote {start + size} rows", flush=True)
        began = time.perf_counter()
        store.maintain_index(TENANT, name)  # the policy's own decision: build with rows // 50k partitions
        store.wait_for_maintenance()
        build = [r for r in store.indexer.history if r.action.value == "build"]
        status = store.index_status(TENANT, name)
        if status["fts_unindexed"] or status["vector_unindexed"]:
            store.maintain_index(TENANT, name)
            store.wait_for_maintenance()
        index_s = time.perf_counter() - began
        status = store.index_status(TENANT, name)
    finally:
        store.close()
    table = lancedb.connect(str(store_dir / TENANT)).open_table(name)
    manifest = {
        "vectors": args.vectors,
        "rows_per_partition": args.rows_per_partition,
        "version": table.version,
        "write_seconds": round(write_s, 1),
        "index_seconds": round(index_s, 1),
        "vector_build_seconds": build[-1].result.get("seconds") if build and build[-1].result else None,
        "index_jobs": [{"action": r.action.value, "reason": r.reason, "seconds": round((r.finished or 0) - r.started, 1),
                        "error": r.error} for r in store.indexer.history],
        "index_status": status,
        "builder_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "disk_mib": round(sum(f.stat().st_size for f in (store_dir / TENANT).rglob("*") if f.is_file()) / 2**20, 1),
    }
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return {**manifest, "reused": False}


# ---- the service --------------------------------------------------------------------------------
class Service:
    """`python -m services.retriever` on the cached store, as its own process."""

    def __init__(self, store_dir: Path, log_path: Path, rows_per_partition: int):
        from tests.grpc_support import free_port, wait_serving

        self.port = free_port()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAGTUNE_RETRIEVER_PORT": str(self.port),
               "RAGTUNE_RETRIEVER_DATA_DIR": str(store_dir), "RAGTUNE_LOG_LEVEL": "INFO",
               "RAGTUNE_RETRIEVER_ANN_ROWS_PER_PARTITION": str(rows_per_partition)}
        self.proc = subprocess.Popen([sys.executable, "-m", "services.retriever"], env=env,
                                     stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
        self.address = f"127.0.0.1:{self.port}"
        wait_serving(self.address, timeout=600, proc=self.proc)

    def memory(self) -> dict:
        return _rss_mib(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ---- measuring ----------------------------------------------------------------------------------
class Visible:
    """How many of the ingested documents are committed now (they commit in stream order)."""

    def __init__(self, store_dir: Path, name: str, base_rows: int):
        import lancedb
        from datetime import timedelta

        self._table = lancedb.connect(str(store_dir / TENANT), read_consistency_interval=timedelta(0)).open_table(name)
        self._base = base_rows

    def __call__(self) -> int:
        return self._table.count_rows() - self._base

    def keyword(self, query: str, limit: int, visible: int | None) -> list[tuple[str, float]]:
        """LanceDB BM25 over the rows visible then (all rows when visible is None)."""
        from lancedb.query import MatchQuery

        search = self._table.search(MatchQuery(query, "text"), query_type="fts")
        if visible is not None:
            search = search.where(f"m_seq IS NULL OR m_seq < {visible}", prefilter=True)
        rows = search.select(["chunk_id", "_score"]).limit(limit).to_list()
        return [(r["chunk_id"], float(r["_score"])) for r in rows]


def _fuse(vector: list[tuple[str, float]], keyword: list[tuple[str, float]], alpha: float, k: int) -> list[str]:
    from services.retriever.domain import Hit
    from services.retriever.ranking import relative_score_fusion

    hit = lambda cid, s: Hit(cid, cid, 0, "", {}, s)  # noqa: E731
    return [h.chunk_id for h in relative_score_fusion([hit(*v) for v in vector], [hit(*k_) for k_ in keyword], alpha, k)]


class Reference:
    """Exact answers for a query over the base rows plus the first `visible` ingested rows (seq < visible).

    The base part of the vector answer is computed once per query; the keyword answer is one BM25 query per
    query over the current state (top 200), filtered to the rows visible then."""

    def __init__(self, base_vectors: np.ndarray, visible: Visible, query_vectors: dict[str, np.ndarray]):
        self.base, self.visible_rows, self.qv = base_vectors, visible, query_vectors
        self.ingested = np.zeros((0, DIM), dtype=np.float32)
        self.ingested_ids: list[str] = []
        self._seq: dict[str, int] = {}
        self._base_top: dict[str, list[tuple[str, float]]] = {}
        self._keyword_cache: dict[str, list[tuple[str, float]]] = {}

    def set_ingested(self, ids_: list[str], matrix: np.ndarray) -> None:
        """The ingested rows in seq order; keyword answers are taken again from the state after the ingest."""
        self.ingested, self.ingested_ids = matrix, ids_
        self._seq = {c: i for i, c in enumerate(ids_)}
        self._keyword_cache.clear()

    def _vector(self, query: str, visible: int, limit: int) -> list[tuple[str, float]]:
        q = self.qv[query]
        if query not in self._base_top:
            scores = self.base @ q
            top = np.argpartition(-scores, 100)[:100]
            self._base_top[query] = [(f"s{i}#0", float(scores[i])) for i in top]
        found = list(self._base_top[query])
        if visible:
            extra = self.ingested[:visible] @ q
            found += [(self.ingested_ids[j], float(extra[j])) for j in np.argsort(-extra)[:limit]]
        return sorted(found, key=lambda x: -x[1])[:limit]

    def _keyword(self, query: str, visible: int | None, limit: int) -> list[tuple[str, float]]:
        if query not in self._keyword_cache:
            self._keyword_cache[query] = self.visible_rows.keyword(query, 200, None)
        rows = self._keyword_cache[query]
        if visible is not None:
            rows = [(c, s) for c, s in rows if self._seq.get(c, -1) < visible]
        return rows[:limit]

    def answer(self, mode: str, query: str, visible: int | None) -> set[str]:
        v = visible or 0
        candidates = max(10, RetrieverSettings().hybrid_candidates)  # the service's (RAGTUNE_RETRIEVER_HYBRID_CANDIDATES)
        if mode == "vector":
            return {c for c, _ in self._vector(query, v, 10)}
        keyword = self._keyword(query, visible, candidates)
        if mode == "keyword":
            return {c for c, _ in keyword[:10]}
        return set(_fuse(self._vector(query, v, candidates), keyword, 0.5, 10))


def snapshot_recall(reference: "Reference", mode: str, query: str, hits: list[str], before: int, after: int) -> float:
    """Recall against the rows visible when the query started, or when it ended if that scores better (a
    batch may commit while it runs); the second reference is only computed when the first is not met."""
    first = len(set(hits) & reference.answer(mode, query, before)) / 10
    if first == 1.0 or after == before:
        return first
    return max(first, len(set(hits) & reference.answer(mode, query, after)) / 10)


def run_queries(stub, name: str, queries: list[str], mode: str, md) -> list[tuple[float, list[str]]]:
    import grpc

    from ragtune.v1 import retriever_pb2 as R

    enum = {"vector": R.SEARCH_MODE_VECTOR, "keyword": R.SEARCH_MODE_KEYWORD, "hybrid": R.SEARCH_MODE_HYBRID}[mode]
    out = []
    for q in queries:
        began = time.perf_counter()
        try:
            reply = stub.Search(R.SearchRequest(collection=name, query=q, mode=enum, top_k=10), metadata=md, timeout=120)
            hits = [h.chunk_id for h in reply.hits]
        except grpc.RpcError as exc:  # counted, with its latency and no hits, rather than ending the run
            print(f"search failed: {exc.code()}", flush=True)
            hits = []
        out.append(((time.perf_counter() - began) * 1000, hits))
    return out


def concurrent_phase(stub, name: str, md, queries: list[str], docs: list[tuple[str, str]], seq0: int,
                     visible: "Visible", args, rebuild: tuple[Path, str] | None = None, pause_s: float = 0.1) -> dict:
    """Streams `docs` (metadata seq = seq0 + position) through Ingest while searching in all three modes, and
    optionally while an index rebuild job runs on the same table; returns the records and the ingest figures."""
    from ragtune.v1 import retriever_pb2 as R

    ingest: dict = {}
    job = None
    if rebuild is not None:
        from services.retriever.backends.lancedb.index import IndexPolicy

        store_dir, table = rebuild
        rows = visible._table.count_rows()
        args_ = {"uri": str(store_dir / TENANT), "table": table, "index_name": "vector_idx", "action": "build",
                 "partitions": IndexPolicy(rows_per_partition=args.rows_per_partition).partitions_for(rows), "nice": 10}
        builder = Path(__file__).resolve().parent.parent / "services/retriever/backends/lancedb/builder.py"
        job = {"started": time.perf_counter(),
               "proc": subprocess.Popen([sys.executable, "-P", str(builder), json.dumps(args_)], stdout=subprocess.PIPE,
                                        text=True)}

    def stream():
        for i in range(0, len(docs), 100):
            yield R.IngestRequest(collection=name, documents=[
                R.Document(id=d, text=t, metadata={"seq": _int(seq0 + i + k)}) for k, (d, t) in enumerate(docs[i : i + 100])])

    def run_ingest():
        began = time.perf_counter()
        reply = stub.Ingest(stream(), metadata=md, timeout=3600)
        ingest["seconds"] = time.perf_counter() - began
        ingest["finished"] = time.perf_counter()
        ingest["reply"] = reply

    worker = threading.Thread(target=run_ingest)
    worker.start()
    records = {m: [] for m in MODES}
    rounds = 0
    while worker.is_alive():
        for mode in MODES:
            for q in queries[rounds % len(queries) :: 20][:5]:
                before = visible()
                (ms, hits), = run_queries(stub, name, [q], mode, md)
                records[mode].append((q, ms, hits, before, visible()))
                time.sleep(pause_s)  # a steady query load, not a flood that starves the ingest of CPU
        rounds += 1
    worker.join()
    reply = ingest["reply"]
    out = {"records": records, "ingest": {
        "documents": reply.committed, "chunks": reply.chunks, "seconds": round(ingest["seconds"], 1),
        "chunks_per_s": round(reply.chunks / ingest["seconds"], 1),
        "docs_per_s": round(reply.committed / ingest["seconds"], 1)}}
    if job is not None:
        still_running = job["proc"].poll() is None
        output, _ = job["proc"].communicate()
        ended = time.perf_counter()
        out["rebuild"] = {"running_when_ingest_finished": still_running,
                          "seconds": round(ended - job["started"], 1),
                          "ingest_finished_after_s": round(ingest["finished"] - job["started"], 1),
                          "result": output.strip().splitlines()[-1] if output.strip() else None}
    return out


def _figures(latencies: list[float], recalls: list[float]) -> dict:
    return {"latency_ms": {k: round(v, 2) for k, v in summary(latencies).items()},
            "recall_at_10": round(float(np.mean(recalls)), 4) if recalls else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=1_000_000, help="chunks in the collection")
    parser.add_argument("--queries", type=int, default=200, help="Jeopardy questions used as queries (per mode)")
    parser.add_argument("--ingest-docs", type=int, default=10_000, help="documents ingested during the second phase")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "ragtune" / "bench" / "retriever-scale")
    parser.add_argument("--block", type=int, default=100_000, help="rows per write while building")
    parser.add_argument("--rebuild", action="store_true", help="build the collection even if the cache has it")
    parser.add_argument("--rows-per-partition", type=int, default=RetrieverSettings.model_fields["ann_rows_per_partition"].default,
                        help="IVF partition size of the vector index (the service's RAGTUNE_RETRIEVER_ANN_ROWS_PER_PARTITION)")
    parser.add_argument("--query-pause-ms", type=float, default=100,
                        help="pause between queries while the ingest runs (a steady load rather than a flood)")
    parser.add_argument("--during-rebuild", action="store_true",
                        help="a third phase: ingest and search again while the vector index is rebuilt")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("RAGTUNE_HOME", str(args.cache / "home"))
    import grpc

    from clients.samples import jeopardy
    from ragtune.tenancy import tenant_metadata
    from ragtune.v1 import retriever_pb2 as R
    from ragtune.v1 import retriever_pb2_grpc

    started = time.perf_counter()
    args.cache.mkdir(parents=True, exist_ok=True)
    texts, base = base_corpus(args.cache)
    built = build_collection(args, args.cache, texts, base)
    print(json.dumps(built, indent=2), flush=True)
    name = f"scale{args.vectors}"
    vectors = synthetic_vectors(texts, base, args.vectors, args.block)
    # Queries: Jeopardy clues, none in the base collection (wiki100 sentences). Clues after the ingested ones
    # where jeopardy_10k has them; it holds exactly 10,000, so with the default 10k-document ingest they come from
    # jeopardy_1k, whose clues are among those ingested: during the ingest a query's own clue becomes visible
    # (the recall reference follows what was visible when each query ran).
    queries = [c["Question"] for c in jeopardy("10k")[args.ingest_docs:]][: args.queries]
    if len(queries) < args.queries:
        queries = [c["Question"] for c in jeopardy("1k")][: args.queries]

    service = Service(args.cache / "store", args.cache / "service.log", args.rows_per_partition)
    md = tenant_metadata(TENANT)
    from services.retriever.server import query_encoder

    result: dict = {"settings": {k: str(v) for k, v in vars(args).items()}, "build": built,
                    # What embeds the queries in the service (RAGTUNE_RETRIEVER_QUERY_ENCODER, as it resolves).
                    "query_runtime": "onnxruntime" if query_encoder(RetrieverSettings()) else "torch"}
    try:
        from sentence_transformers import SentenceTransformer

        from ragtune.models import embedding_model_path

        model = SentenceTransformer(str(embedding_model_path()), device="cpu")
        query_vectors = dict(zip(queries, model.encode(queries, normalize_embeddings=True).astype(np.float32)))
        visible = Visible(args.cache / "store", name, args.vectors)
        reference = Reference(vectors, visible, query_vectors)
        with grpc.insecure_channel(service.address) as channel:
            stub = retriever_pb2_grpc.RetrieverServiceStub(channel)
            for mode in MODES:  # warm-up: load the indexes into memory
                run_queries(stub, name, queries[:10], mode, md)
            result["memory_at_rest"] = service.memory()

            # Phase 1: at rest.
            at_rest = {}
            for mode in MODES:
                runs = run_queries(stub, name, queries, mode, md)
                recalls = [len(set(hits) & reference.answer(mode, q, None)) / 10 for q, (_, hits) in zip(queries, runs)]
                at_rest[mode] = _figures([ms for ms, _ in runs], recalls)
            result["at_rest"] = at_rest
            print(json.dumps(at_rest, indent=2), flush=True)

            # Phase 2: the same queries while a 10k-document ingest streams into the collection.
            docs = ingest_documents(args.ingest_docs)
            pause = args.query_pause_ms / 1000
            phase = concurrent_phase(stub, name, md, queries, docs, 0, visible, args, pause_s=pause)
            result["memory_after_ingest"] = service.memory()
            # Phase 3 (optional): again, while the vector index is rebuilt by the same job the service's
            # maintainer runs (a child process on the same table), to show neither waits on it.
            rebuild_phase = None
            if args.during_rebuild:
                rebuild_phase = concurrent_phase(stub, name, md, queries, [(f"rb{d[3:]}", t) for d, t in docs],
                                                 len(docs), visible, args, rebuild=(args.cache / "store", name), pause_s=pause)
            ids_, matrix = _ingested_vectors(visible, len(docs) * (2 if rebuild_phase else 1))
            reference.set_ingested(ids_, matrix)
            for label, data in (("during_ingest", phase), ("during_ingest_and_rebuild", rebuild_phase)):
                if data is None:
                    continue
                figures = {}
                for mode in MODES:
                    recalls = [snapshot_recall(reference, mode, q, hits, b, a) for q, _, hits, b, a in data["records"][mode]]
                    figures[mode] = _figures([ms for _, ms, _, _, _ in data["records"][mode]], recalls)
                result[label] = {**figures, "ingest": data["ingest"], **({"rebuild": data["rebuild"]} if "rebuild" in data else {})}
                print(label, json.dumps(result[label], indent=2), flush=True)
            result["index_status_after_ingest"] = _status(args.cache / "store", name)
    finally:
        service.stop()
    target = {"recall_at_10": 0.95, "p95_ms": 20.0}
    phases = [result.get("at_rest", {}), result.get("during_ingest", {}), result.get("during_ingest_and_rebuild") or {}]
    result["target"] = target
    result["meets_target"] = all(
        p[m]["recall_at_10"] >= target["recall_at_10"] and p[m]["latency_ms"]["p95"] < target["p95_ms"]
        for p in phases for m in MODES if m in p
    )
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps({k: v for k, v in result.items() if k != "build"}, indent=2))
    write_result(f"retriever_scale_{args.vectors}", result)
    return 0


def _int(value: int):
    from ragtune.values import to_value

    return to_value(value)


def _ingested_vectors(visible: Visible, count: int) -> tuple[list[str], np.ndarray]:
    """The ingested chunks' vectors in stream order (ing0#0, ing1#0, ...)."""
    data = visible._table.search().where("m_seq IS NOT NULL").select(["chunk_id", "m_seq", "vector"]).limit(count + 10).to_arrow()
    order = np.argsort(data["m_seq"].to_numpy())
    matrix = data["vector"].combine_chunks().flatten().to_numpy().reshape(len(data), DIM)[order]
    ids_ = [data["chunk_id"][int(i)].as_py() for i in order]
    return ids_, np.asarray(matrix, dtype=np.float32)


def _status(store_dir: Path, name: str) -> dict:
    import lancedb

    table = lancedb.connect(str(store_dir / TENANT)).open_table(name)
    out = {}
    for index in table.list_indices():
        stats = table.index_stats(index.name)
        out[index.name] = {"indexed": stats.num_indexed_rows, "unindexed": stats.num_unindexed_rows}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
