"""Runs one LanceDB index job (build or optimize) in its own low-priority process and prints a JSON result.

Why a separate process: an index build inside the service starves LanceDB's shared runtime (a 1,000-row
append waited 22 s behind an in-process IVF_HNSW_SQ build here) and competes with searches for the CPU.
In a child process at a lower CPU priority (nice 10 by default, and the SCHED_IDLE class when asked) the service's writes and searches keep their own runtime and take the CPU
first. The job commits through LanceDB's optimistic concurrency, so writes committed meanwhile are kept
(their rows are simply not in the new index yet). Imports only LanceDB, its `lance` library and the
standard library, so it can run as a plain script.

Optimize folds new rows into each index as a new *segment* (Lance's `num_indices_to_merge=0`) instead of
LanceDB's `table.optimize()`, which merged them into the trained vector index and so rebuilt its HNSW
graphs: 562 s for 10k new rows at 1M rows, as long as the build itself, against 1.4 s as segments (0.2 s
the full-text and id indexes, 1.2 s the vector index). A search reads every segment, so once an index has
`max_segments` of them the fold merges the newer ones (never the trained one) into one: its cost follows
the rows added since the build (three 1k-row segments: 0.5 s). Small fragments left by many small writes
are compacted into larger ones after the folds, while every fragment is indexed; fragments already
`fragment_rows` large are not rewritten.

Usage: python -P builder.py '{"uri": ..., "table": ..., "action": "build"|"optimize", ...}'
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from datetime import timedelta


def _build(table, job: dict) -> dict:
    from lancedb.index import BTree, HnswSq

    started = time.monotonic()
    rows = table.count_rows()
    table.create_index(
        "vector",
        config=HnswSq(
            distance_type="cosine",
            num_partitions=job["partitions"],
            m=job.get("m", 20),
            ef_construction=job.get("ef_construction", 300),
        ),
        replace=True,
        name=job["index_name"],
    )
    if job.get("fts"):
        # Far behind (e.g. after a bulk load): a fresh full-text index is cheaper than folding every row into
        # it, and an optimize would also merge the vector index just built all over again.
        table.create_fts_index("text", use_tantivy=False, replace=True)
    if not any(i.name == "document_id_idx" for i in table.list_indices()):
        # Content-hash look-ups and deletes filter on document_id: without this they scan every row.
        table.create_index("document_id", config=BTree(), replace=True, name="document_id_idx")
    return {"rows": rows, "seconds": round(time.monotonic() - started, 2)}


def _compact(dataset, job: dict) -> dict | None:
    """Merges small fragments once there are `compact_fragments` of them (each small write leaves one), but
    only while the vector index covers every fragment (right after a fold that no write raced): searches use
    the newest fully indexed version as their base while rows are appended (vector.py), and a
    compaction that rewrites its fragments mid-ingest would send them to LanceDB's slower plan until the
    next such version (at 1M rows, 67 of 400 queries during a 10k-document ingest)."""
    fragments = dataset.get_fragments()
    covered = None
    for index in dataset.list_indices():
        if index["name"] == job["index_name"]:
            covered = (covered or set()) | set(index["fragment_ids"])
    if covered is not None and any(f.fragment_id not in covered for f in fragments):
        return None
    target = job.get("fragment_rows", 100_000)
    small = sum(1 for f in fragments if f.count_rows() < target)
    if small < job.get("compact_fragments", 8):
        return None
    metrics = dataset.optimize.compact_files(target_rows_per_fragment=target)
    return {"fragments_removed": metrics.fragments_removed, "fragments_added": metrics.fragments_added}


def _latest(table):
    """The table's newest version as a `lance` dataset (a handle pins the version it last saw)."""
    table.checkout_latest()
    return table.to_lance()


def _optimize(table, job: dict) -> dict:
    started = time.monotonic()
    folded = {}
    for index in table.list_indices():
        table.checkout_latest()
        stats = table.index_stats(index.name)
        # Merge the newer segments (num_indices - 1: all but the trained one) once there are too many.
        merge = stats.num_indices - 1 if stats.num_indices >= job.get("max_segments", 4) else 0
        if stats.num_unindexed_rows == 0 and merge == 0:
            continue
        _latest(table).optimize.optimize_indices(index_names=[index.name], num_indices_to_merge=merge)
        folded[index.name] = {"rows": stats.num_unindexed_rows, "merged_segments": merge}
    compacted = _compact(_latest(table), job)  # after the folds: see _compact
    # Old versions (every write makes one) are pruned at LanceDB's default age, as `table.optimize()` did.
    _latest(table).cleanup_old_versions(older_than=timedelta(days=7))
    return {"seconds": round(time.monotonic() - started, 2), "compacted": compacted, "folded": folded}


def run(job: dict) -> dict:
    import lancedb

    os.nice(job.get("nice", 10))
    if job.get("idle") and hasattr(os, "SCHED_IDLE"):
        # Before LanceDB starts its threads, which inherit it: the job runs on cores no search wants.
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    table = lancedb.connect(job["uri"]).open_table(job["table"])
    result = (_build if job["action"] == "build" else _optimize)(table, job)
    return {**result, "idle": hasattr(os, "SCHED_IDLE") and os.sched_getscheduler(0) == os.SCHED_IDLE}


def main() -> int:
    warnings.simplefilter("ignore")
    job = json.loads(sys.argv[1])
    try:
        result = run(job)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which logs it and retries later
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
