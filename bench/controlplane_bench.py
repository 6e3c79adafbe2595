"""Control-plane benchmark: the job queue's own overhead on SQLite and on PostgreSQL, in one run.

For each backend, on a fresh database (a temporary SQLite file; a new PostgreSQL database
ragtune_bench_<random> created on the server and dropped with FORCE at the end), after `migrate()`:
- transaction floor: latency of an empty transaction (SELECT 1 through `Database.transaction`);
- enqueue rate: `JobStore.create` jobs/s, single-threaded, for --jobs jobs;
- uncontended claim latency: one process claims (and finishes) --solo-jobs further jobs alone;
- 4 workers: --workers worker processes (multiprocessing, spawn, each with its own `Database`)
  loop claim -> set RUNNING (worker=) -> 3 progress events -> renew -> set SUCCEEDED (worker=)
  until nothing is claimable. Wall time runs from releasing the started workers to the last one
  done; jobs/s = jobs completed / wall time. Claim latency p50/p95 is over the claims that
  returned a job (contended). Every other operation's latency is reported too, and every
  DatabaseUnavailable (e.g. SQLite's 'database is locked') a worker met, which it retries.
Afterwards the database itself is checked: every job SUCCEEDED, attempts == 1 for all (none claimed
twice), the job count equals the jobs enqueued (none lost), and each job has its 6 events in an
unbroken sequence; the workers' own lists of claimed ids must not overlap either.

Backends alternate over --repeats runs (each on a fresh database) so that load from other processes
falls on both; each backend reports its run with the best jobs/s, and every run's checks must pass.

Run: .venv/bin/python -m bench.controlplane_bench [--jobs 400] [--workers 4] [--repeats 3]
     [--backends sqlite,postgresql] [--pg-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres]
Writes bench/results/controlplane.json.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path

from bench.common import summary, write_result

LEASE_S = 60.0
PROGRESS_EVENTS = 3
EVENTS_PER_JOB = 1 + 1 + PROGRESS_EVENTS + 1  # QUEUED, RUNNING, progress x3, SUCCEEDED
RETRIES = 20


def _retrying(op, errors: dict[str, int], name: str):
    """Runs op(), retrying DatabaseUnavailable (counted per operation) with a short backoff."""
    from ragtune.controlplane.database import DatabaseUnavailable

    for attempt in range(RETRIES):
        try:
            return op()
        except DatabaseUnavailable as error:
            cause = error.__cause__
            key = f"{name}: {type(getattr(cause, 'orig', cause)).__name__}: {str(getattr(cause, 'orig', cause))[:80]}"
            errors[key] = errors.get(key, 0) + 1
            if attempt == RETRIES - 1:
                raise
            time.sleep(0.01 * (attempt + 1))


def run_worker(url: str, worker: str, ready, start, results) -> None:
    """One worker process: its own Database; waits for `start`, then drains the queue."""
    try:
        from ragtune.controlplane.database import Database
        from ragtune.controlplane.jobs import QUEUED, RUNNING, SUCCEEDED, JobStore

        db = Database(url)
        store = JobStore(db)
        db.ping()  # connect (and import everything) before the clock starts
        errors: dict[str, int] = {}
        latency: dict[str, list[float]] = {k: [] for k in ("claim", "claim_empty", "set_running", "record", "renew",
                                                           "set_succeeded")}
        anomalies: list[str] = []
        claimed: list[str] = []
        ready.set()
        start.wait()
        began = time.perf_counter()

        def timed(kind, op):
            t0 = time.perf_counter()
            value = _retrying(op, errors, kind)
            latency[kind].append((time.perf_counter() - t0) * 1000)
            return value

        while True:
            t0 = time.perf_counter()
            job = _retrying(lambda: store.claim(worker, LEASE_S), errors, "claim")
            elapsed = (time.perf_counter() - t0) * 1000
            if job is None:
                latency["claim_empty"].append(elapsed)
                break
            latency["claim"].append(elapsed)
            claimed.append(job.id)
            if not timed("set_running", lambda: store.set_state(job.id, RUNNING, only_from=(QUEUED,), worker=worker)):
                anomalies.append(f"{job.id}: set RUNNING refused")
                continue
            for step in range(1, PROGRESS_EVENTS + 1):
                timed("record", lambda: store.record(job.id, "progress", {"step": step}, step=step,
                                                     total_steps=PROGRESS_EVENTS))
            status = timed("renew", lambda: store.renew(job.id, worker, LEASE_S))
            if not status.held:
                anomalies.append(f"{job.id}: lease lost at renew")
            if not timed("set_succeeded", lambda: store.set_state(job.id, SUCCEEDED, only_from=(RUNNING,),
                                                                  worker=worker)):
                anomalies.append(f"{job.id}: set SUCCEEDED refused")
        finished = time.perf_counter()
        db.dispose()
        results.put({"worker": worker, "ok": True, "latency": latency, "errors": errors, "anomalies": anomalies,
                     "claimed": claimed, "began": began, "finished": finished})
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the run
        results.put({"worker": worker, "ok": False, "traceback": traceback.format_exc()})


def _enqueue(store, count: int, tenant: str) -> tuple[float, list[str]]:
    ids = []
    t0 = time.perf_counter()
    for i in range(count):
        job, created = store.create(tenant, {"base_model": "tiny", "method": "lora", "i": i}, f"req-{i}")
        assert created
        ids.append(job.id)
    return time.perf_counter() - t0, ids


def _solo(store, count: int) -> list[float]:
    """Claims and finishes `count` jobs from this process alone: uncontended claim latencies (ms)."""
    from ragtune.controlplane.jobs import QUEUED, RUNNING, SUCCEEDED

    latencies = []
    for _ in range(count):
        t0 = time.perf_counter()
        job = store.claim("solo", LEASE_S)
        latencies.append((time.perf_counter() - t0) * 1000)
        assert job is not None
        store.set_state(job.id, RUNNING, only_from=(QUEUED,), worker="solo")
        store.set_state(job.id, SUCCEEDED, only_from=(RUNNING,), worker="solo")
    return latencies


def _verify(db, expected: int, tenant: str = "bench") -> dict:
    """What the database says about the workers' jobs (tenant `bench`; the solo jobs are left out)."""
    from sqlalchemy import func, select

    from ragtune.controlplane.schema import job_events, jobs

    mine = jobs.c.tenant == tenant
    with db.transaction() as c:
        total = c.execute(select(func.count()).select_from(jobs).where(mine)).scalar_one()
        by_state = dict(c.execute(select(jobs.c.state, func.count()).where(mine).group_by(jobs.c.state)).all())
        by_attempts = {int(k): v for k, v in
                       c.execute(select(jobs.c.attempts, func.count()).where(mine).group_by(jobs.c.attempts)).all()}
        counts = (select(job_events.c.job_id, func.count().label("n"), func.max(job_events.c.sequence).label("top"))
                  .group_by(job_events.c.job_id).subquery())
        bad_events = c.execute(
            select(func.count()).select_from(jobs.outerjoin(counts, counts.c.job_id == jobs.c.id)).where(mine).where(
                (func.coalesce(counts.c.n, 0) != EVENTS_PER_JOB) | (counts.c.top != EVENTS_PER_JOB)
                | (jobs.c.last_sequence != EVENTS_PER_JOB))
        ).scalar_one()
        still_leased = c.execute(select(func.count()).select_from(jobs).where(mine, jobs.c.worker_id.is_not(None))
                                 ).scalar_one()
    succeeded = by_state.get("SUCCEEDED", 0)
    claimed_once = by_attempts.get(1, 0)
    return {
        "jobs_expected": expected,
        "jobs_in_database": total,
        "jobs_lost": expected - total,
        "succeeded": succeeded,
        "by_state": by_state,
        "attempts_histogram": by_attempts,
        "claimed_once": claimed_once,
        "claimed_more_than_once": sum(v for k, v in by_attempts.items() if k > 1),
        "never_claimed": by_attempts.get(0, 0),
        "jobs_with_wrong_events": bad_events,
        "jobs_still_leased": still_leased,
        "all_ok": total == expected and succeeded == expected and claimed_once == expected and bad_events == 0
        and still_leased == 0,
    }


def bench_backend(backend: str, url: str, jobs: int, workers: int, solo_jobs: int, floor_n: int) -> dict:
    from ragtune.controlplane.database import Database
    from ragtune.controlplane.jobs import JobStore

    db = Database(url)
    revision = db.migrate()
    store = JobStore(db)
    # Transaction floor: the cost of any call before it does anything.
    floor = []
    for _ in range(floor_n):
        t0 = time.perf_counter()
        db.ping()
        floor.append((time.perf_counter() - t0) * 1000)

    # Uncontended: enqueue solo jobs, then claim them from this process alone.
    _enqueue(store, solo_jobs, "solo")
    solo_claims = _solo(store, solo_jobs)

    # Enqueue rate (the jobs the workers will drain).
    enqueue_s, ids = _enqueue(store, jobs, "bench")

    # Workers.
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    start = ctx.Event()
    readies, procs = [], []
    for w in range(workers):
        ready = ctx.Event()
        p = ctx.Process(target=run_worker, args=(url, f"w{w}", ready, start, results), daemon=True)
        p.start()
        readies.append(ready)
        procs.append(p)
    for ready, p in zip(readies, procs):
        while not ready.wait(0.2):
            if not p.is_alive():
                break
    t0 = time.perf_counter()
    start.set()
    outcomes = []
    for _ in procs:
        outcomes.append(results.get(timeout=600))
    wall_s = time.perf_counter() - t0
    for p in procs:
        p.join(timeout=30)
    failed = [o for o in outcomes if not o["ok"]]
    if failed:
        for o in failed:
            print(f"[{backend}] worker {o['worker']} failed:\n{o['traceback']}", file=sys.stderr)
        raise RuntimeError(f"{backend}: {len(failed)} worker(s) failed")

    latency: dict[str, list[float]] = {}
    errors: dict[str, int] = {}
    anomalies: list[str] = []
    claimed: list[str] = []
    per_worker = {}
    for o in outcomes:
        for kind, values in o["latency"].items():
            latency.setdefault(kind, []).extend(values)
        for key, n in o["errors"].items():
            errors[key] = errors.get(key, 0) + n
        anomalies.extend(o["anomalies"])
        claimed.extend(o["claimed"])
        per_worker[o["worker"]] = {"jobs": len(o["claimed"]), "busy_s": o["finished"] - o["began"]}
    work_ids = set(ids)
    verification = _verify(db, jobs)
    verification.update(
        worker_claims=len(claimed),
        worker_claims_distinct=len(set(claimed)),
        worker_claims_outside_batch=len(set(claimed) - work_ids),
        worker_batch_jobs_unclaimed=len(work_ids - set(claimed)),
        worker_anomalies=anomalies[:20],
        worker_anomaly_count=len(anomalies),
    )
    verification["all_ok"] = (verification["all_ok"] and len(claimed) == len(set(claimed)) == jobs
                              and not anomalies and verification["worker_claims_outside_batch"] == 0)
    settings = _settings(db)
    db.dispose()
    return {
        "backend": backend,
        "settings": settings,
        "schema_revision": revision,
        "transaction_floor_ms": summary(floor),
        "enqueue": {"jobs": jobs, "seconds": enqueue_s, "jobs_per_second": jobs / enqueue_s},
        "claim_uncontended_ms": summary(solo_claims),
        "workers": {
            "processes": workers,
            "jobs": jobs,
            "wall_s": wall_s,
            "jobs_per_second": jobs / wall_s,
            # claim (+ its get), RUNNING, the records, renew, SUCCEEDED
            "transactions_per_job": 2 + 1 + PROGRESS_EVENTS + 1 + 1,
            "per_worker": per_worker,
            "claim_ms": summary(latency["claim"]),
            "claim_empty_ms": summary(latency["claim_empty"]),
            "op_ms": {k: summary(v) for k, v in latency.items() if k not in ("claim", "claim_empty")},
            "database_unavailable_retries": errors,
            "database_unavailable_total": sum(errors.values()),
        },
        "verification": verification,
    }


def _settings(db) -> dict:
    """What decides commit cost: durability settings as the benchmark's connections see them."""
    from sqlalchemy import text

    with db.transaction() as c:
        if db.is_sqlite:
            return {name: c.exec_driver_sql(f"PRAGMA {name}").scalar() for name in ("journal_mode", "synchronous",
                                                                                     "busy_timeout")}
        return {name: c.execute(text(f"SHOW {name}")).scalar() for name in ("server_version", "fsync",
                                                                             "synchronous_commit", "max_connections")}


def _pg_database(admin_url: str):
    """Creates ragtune_bench_<random> on the server; returns (sqlalchemy url, drop callable)."""
    import psycopg
    from sqlalchemy.engine import make_url

    admin = make_url(admin_url).set(drivername="postgresql")
    conninfo = admin.render_as_string(hide_password=False)
    name = f"ragtune_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(conninfo, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')

    def drop():
        with psycopg.connect(conninfo, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    url = make_url(admin_url).set(drivername="postgresql+psycopg", database=name)
    return url.render_as_string(hide_password=False), name, drop


def _row(r: dict) -> str:
    w = r["workers"]
    v = r["verification"]
    return (f"{r['backend']:<11} {r['transaction_floor_ms']['p50']:>7.2f} {r['enqueue']['jobs_per_second']:>9.0f} "
            f"{r['claim_uncontended_ms']['p50']:>7.2f} {r['claim_uncontended_ms']['p95']:>7.2f} "
            f"{w['claim_ms']['p50']:>7.2f} {w['claim_ms']['p95']:>7.2f} {w['jobs_per_second']:>8.1f} "
            f"{w['wall_s']:>7.2f} {w['database_unavailable_total']:>7d} "
            f"{v['succeeded']:>5d}/{v['jobs_expected']:<5d} {v['claimed_more_than_once']:>6d} {v['jobs_lost']:>5d} "
            f"{'ok' if v['all_ok'] else 'FAIL':>4}")


def _run_once(backend: str, args) -> dict:
    load_before = os.getloadavg()[0]
    if backend == "sqlite":
        with tempfile.TemporaryDirectory(prefix="ragtune-cp-bench-") as folder:
            url = f"sqlite:///{Path(folder) / 'controlplane.sqlite3'}"
            result = bench_backend(backend, url, args.jobs, args.workers, args.solo_jobs, args.floor)
            result["database"] = "temporary file"
    else:
        url, name, drop = _pg_database(args.pg_url)
        try:
            result = bench_backend(backend, url, args.jobs, args.workers, args.solo_jobs, args.floor)
            result["database"] = f"{name} (dropped)"
        finally:
            drop()
    result["load_average_1m"] = {"before": load_before, "after": os.getloadavg()[0]}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=400, help="jobs the workers drain (and the enqueue count)")
    parser.add_argument("--workers", type=int, default=4, help="worker processes")
    parser.add_argument("--solo-jobs", type=int, default=100, help="jobs claimed by one process alone first")
    parser.add_argument("--floor", type=int, default=200, help="empty transactions timed")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per backend, alternating backends; the one with the best jobs/s is reported")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--pg-url", default=os.environ.get("RAGTUNE_BENCH_PG_ADMIN_URL",
                                                           "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"),
                        help="an admin connection (its database is only used to CREATE/DROP the bench database)")
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(backends) - {"sqlite", "postgresql"}
    if unknown:
        parser.error(f"unknown backend(s): {', '.join(sorted(unknown))}")

    # Backends alternate (sqlite, postgresql, sqlite, ...) so that load from other processes on a
    # shared machine falls on both; each fresh database per run.
    runs: dict[str, list[dict]] = {b: [] for b in backends}
    for repeat in range(args.repeats):
        for backend in backends:
            result = _run_once(backend, args)
            runs[backend].append(result)
            w = result["workers"]
            print(f"[{backend} run {repeat + 1}/{args.repeats}] {w['jobs_per_second']:.1f} jobs/s with "
                  f"{args.workers} workers, claim p50 {w['claim_ms']['p50']:.2f} ms, "
                  f"checks {'ok' if result['verification']['all_ok'] else 'FAILED'}", flush=True)

    results = []
    for backend, backend_runs in runs.items():
        best = dict(max(backend_runs, key=lambda r: r["workers"]["jobs_per_second"]))
        best["runs"] = [
            {
                "jobs_per_second": r["workers"]["jobs_per_second"],
                "enqueue_jobs_per_second": r["enqueue"]["jobs_per_second"],
                "claim_p50_ms": r["workers"]["claim_ms"]["p50"],
                "claim_p95_ms": r["workers"]["claim_ms"]["p95"],
                "database_unavailable_total": r["workers"]["database_unavailable_total"],
                "load_average_1m": r["load_average_1m"],
                "all_ok": r["verification"]["all_ok"],
            }
            for r in backend_runs
        ]
        best["all_runs_ok"] = all(r["verification"]["all_ok"] for r in backend_runs)
        results.append(best)

    header = (f"{'backend':<11} {'tx p50':>7} {'enq/s':>9} {'cl1 p50':>7} {'cl1 p95':>7} {'clN p50':>7} "
              f"{'clN p95':>7} {'jobs/s':>8} {'wall s':>7} {'retries':>7} {'succeeded':>11} {'dup':>6} "
              f"{'lost':>5} {'chk':>4}")
    print()
    print(f"best of {args.repeats} runs per backend; times in ms; tx = empty transaction; cl1 = claim alone; "
          f"clN = claim with {args.workers} workers (claims that returned a job)")
    print(header)
    for r in results:
        print(_row(r))
    for r in results:
        ops = ", ".join(f"{k} {v['p50']:.2f}/{v['p95']:.2f}" for k, v in r["workers"]["op_ms"].items())
        print(f"{r['backend']}: op p50/p95 ms {ops}")
        print(f"{r['backend']}: jobs/s of each run " + ", ".join(f"{x['jobs_per_second']:.1f}" for x in r["runs"]))
        if r["workers"]["database_unavailable_retries"]:
            print(f"{r['backend']}: retried {r['workers']['database_unavailable_retries']}")
    payload = {
        "setup": {
            "jobs": args.jobs,
            "workers": args.workers,
            "solo_jobs": args.solo_jobs,
            "repeats": args.repeats,
            "reported_run": "best jobs/s per backend; every run's checks must pass",
            "lease_s": LEASE_S,
            "progress_events_per_job": PROGRESS_EVENTS,
            "worker_loop": "claim -> set RUNNING(worker) -> record x3 -> renew -> set SUCCEEDED(worker)",
            "start_method": "spawn",
        },
        "backends": {r["backend"]: r for r in results},
        "all_ok": all(r["all_runs_ok"] for r in results),
    }
    write_result("controlplane", payload)
    return 0 if payload["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
