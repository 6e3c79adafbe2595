"""Runs one LanceDB index job (build or optimize) in its own low-priority process and prints a JSON result.

Why a separate process: an index build inside the service starves LanceDB's shared runtime (a 1,000-row
append waited 22 s behind an in-process IVF_HNSW_SQ build here) and competes with searches for the CPU.
In a child process at a lower CPU priority (nice 10 by default) the service's writes and searches keep their own runtime and take the CPU
first. The job commits through LanceDB's optimistic concurrency, so writes committed meanwhile are kept
(their rows are simply not in the new index yet). Imports only LanceDB and the standard library, so it can
run as a plain script.

Usage: python lancedb_builder.py '{"uri": ..., "table": ..., "action": "build"|"optimize", ...}'
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings


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


def _optimize(table, job: dict) -> dict:
    started = time.monotonic()
    # Compacts small fragments, prunes old versions (LanceDB's default age) and folds unindexed rows
    # into every index: the vector index keeps its trained partitions; the full-text index is extended.
    table.optimize()
    return {"seconds": round(time.monotonic() - started, 2)}


def run(job: dict) -> dict:
    import lancedb

    os.nice(job.get("nice", 10))
    table = lancedb.connect(job["uri"]).open_table(job["table"])
    return (_build if job["action"] == "build" else _optimize)(table, job)


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
