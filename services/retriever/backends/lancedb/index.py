"""Keeps each LanceDB collection's indexes fresh off the write path: the policy and the background worker.

Policy (`IndexPolicy.plan`), applied after every write and again after every job:

- below `min_rows` chunks a collection has no vector index: vector search is exact;
- from `min_rows` on it gets an IVF_HNSW_SQ index with about `rows_per_partition` rows per partition (500k:
  a query searches the HNSW graph of every partition it probes, so a few large graphs answer sooner than many
  small ones; at 1M rows two partitions built in 539 s, against 1,301 s for twenty of 50k, and a search
  took 8 ms p50 at recall@10 0.977 in process, with the query settings in search.py);
- rows written since the last job are *unindexed*: LanceDB searches them exactly alongside the indexes, so
  they are found at once. An optimize job folds them into every index, as a new segment of it,
  once the full-text index has more than `fold_min_rows` of them, or a tenth of a smaller collection's rows
  (at least 100; its exact search is the expensive one:
  measured about 15 ms per 1,000 unindexed rows on the loaded 2-core machine, against well under 1 ms for
  vectors) or the vector index more than `fold_fraction` of the collection. A fold costs what indexing the
  new rows costs, not a rebuild (10k new rows at 1M: 1.4 s), and merges the newer segments once an index
  has four (see builder.py);
- rows still unindexed once the collection has had no write for `quiet_s` seconds (an ingest that ended below
  the thresholds) are folded then, with the compaction that follows a fold, so a collection at rest is
  searched through its indexes alone (only collections that have a vector index: smaller ones are cheap);
- when the collection has grown or shrunk so that the wanted partition count differs from the built one by
  `drift` times (partitions would hold twice or half the rows they were trained for), the index is rebuilt,
  so growth by doubling keeps the total build work linear in the collection size.

Jobs run one at a time in a child process (`builder.py`, at a lower CPU priority, in the SCHED_IDLE class by default). No lock is held while they run:
writes and searches go on, and LanceDB's optimistic commits keep the rows written meanwhile (they stay
unindexed, searched exactly, until the next job folds them in).
"""

from __future__ import annotations

import enum
import json
import logging
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

# Run as a plain script with -P (its folder not put on sys.path): beside it lie modules named like
# common top-level ones (index, sql, search), which must not shadow those for the child.
_BUILDER = Path(__file__).with_name("builder.py")


class Action(str, enum.Enum):
    NONE = "none"
    OPTIMIZE = "optimize"
    BUILD = "build"


@dataclass(frozen=True)
class IndexState:
    """What a collection's table looks like now (from LanceDB's index statistics)."""

    rows: int
    vector_partitions: int | None  # None: no vector index
    vector_unindexed: int = 0
    fts_unindexed: int = 0


@dataclass(frozen=True)
class IndexPolicy:
    min_rows: int = 10_000
    rows_per_partition: int = 500_000
    max_partitions: int = 256
    fold_fraction: float = 0.05
    fold_min_rows: int = 1_000
    # A small collection's full-text index is folded once a tenth of its rows are missing from it (never for
    # fewer than 100): 604 unindexed 200-token chunks cost a keyword search 22 ms, indexed ones about 2.
    fts_fold_fraction: float = 0.1
    fts_fold_floor: int = 100
    drift: float = 2.0
    quiet_s: float | None = 30.0  # None: no fold for a quiet collection

    def partitions_for(self, rows: int) -> int:
        return max(1, min(self.max_partitions, rows // self.rows_per_partition))

    def fold_threshold(self, rows: int) -> float:
        """Unindexed vector rows beyond which they are folded into the index."""
        return max(self.fold_min_rows, self.fold_fraction * rows)

    def fts_fold_threshold(self, rows: int) -> float:
        """Unindexed full-text rows beyond which they are folded into the index."""
        return max(self.fts_fold_floor, min(self.fold_min_rows, self.fts_fold_fraction * rows))

    def plan(self, state: IndexState, *, quiet: bool = False) -> tuple[Action, str]:
        """The next job for a collection, with the reason (logged and shown by `status`); `quiet`: it has had
        no write for `quiet_s` seconds."""
        if state.vector_partitions is None:
            if state.rows >= self.min_rows:
                return Action.BUILD, f"{state.rows} rows reached the index threshold {self.min_rows}"
        else:
            wanted, built = self.partitions_for(state.rows), state.vector_partitions
            if wanted >= self.drift * built or built >= self.drift * wanted:
                return Action.BUILD, f"{state.rows} rows want {wanted} partitions; the index has {built}"
        if state.fts_unindexed > self.fts_fold_threshold(state.rows):
            return Action.OPTIMIZE, f"{state.fts_unindexed} of {state.rows} rows not in the full-text index"
        if state.vector_partitions and state.vector_unindexed > self.fold_threshold(state.rows):
            return Action.OPTIMIZE, f"{state.vector_unindexed} of {state.rows} rows not in the vector index"
        if quiet and state.vector_partitions is not None and (state.vector_unindexed or state.fts_unindexed):
            unindexed = max(state.vector_unindexed, state.fts_unindexed)
            return Action.OPTIMIZE, f"{unindexed} rows unindexed after {self.quiet_s:g} s without writes"
        return Action.NONE, "up to date"


@dataclass
class JobRecord:
    """One finished or running job, for status, logs and tests."""

    key: tuple[str, str]
    action: Action
    reason: str
    started: float
    finished: float | None = None
    error: str | None = None
    result: dict | None = None


class IndexMaintainer:
    """One background thread that runs index jobs for any collection, one job at a time.

    `schedule(key)` is cheap and never blocks: it marks the collection dirty and wakes the thread. The
    thread asks `inspect(key)` for the collection's state and `job_args(key, action, state)` for the job,
    runs it in a child process, calls `on_done(key, action, state, result)`, and re-plans the collection
    until the policy says it is up to date (rows keep arriving while a job runs)."""

    def __init__(
        self,
        policy: IndexPolicy,
        inspect: Callable[[tuple[str, str]], IndexState | None],
        job_args: Callable[[tuple[str, str], Action, IndexState], dict],
        on_done: Callable[[tuple[str, str], Action, IndexState, dict], None],
    ):
        self.policy = policy
        self._inspect, self._job_args, self._on_done = inspect, job_args, on_done
        self._cond = threading.Condition()
        self._dirty: dict[tuple[str, str], None] = {}  # insertion-ordered set
        self._forced: set[tuple[str, str]] = set()
        self._quiet: dict[tuple[str, str], float] = {}  # when each written collection turns quiet (monotonic)
        self._busy: tuple[str, str] | None = None
        self._child: subprocess.Popen | None = None
        self._closed = False
        self.history: list[JobRecord] = []
        self.running: JobRecord | None = None
        self._thread = threading.Thread(target=self._loop, name="lancedb-index", daemon=True)
        self._thread.start()

    # ---- requests -----------------------------------------------------------------------------
    def schedule(self, key: tuple[str, str], *, rebuild: bool = False) -> None:
        with self._cond:
            if self._closed:
                return
            self._dirty[key] = None
            if self.policy.quiet_s is not None:
                self._quiet[key] = time.monotonic() + self.policy.quiet_s
            if rebuild:
                self._forced.add(key)
            self._cond.notify_all()

    def forget(self, key: tuple[str, str]) -> None:
        """The collection is gone: drop pending work; a running job's result is discarded by its caller."""
        with self._cond:
            self._dirty.pop(key, None)
            self._quiet.pop(key, None)
            self._forced.discard(key)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Blocks until no job is running or pending (benchmarks and tests); a quiet fold not yet due is not
        pending."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._dirty or self._busy is not None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._dirty.clear()
            self._quiet.clear()
            child = self._child
            self._cond.notify_all()
        if child is not None and child.poll() is None:
            child.terminate()  # a half-built index is never committed; the next start rebuilds it
        self._thread.join(timeout=30)

    # ---- the worker ---------------------------------------------------------------------------
    def _next(self) -> tuple[tuple[str, str], bool, bool] | None:
        """The next collection to plan: a written one, else one whose quiet period is over (then quiet=True)."""
        with self._cond:
            while not self._dirty and not self._closed:
                now = time.monotonic()
                due = min(self._quiet.items(), key=lambda item: item[1], default=None)
                if due is not None and due[1] <= now:
                    del self._quiet[due[0]]
                    self._busy = due[0]
                    return due[0], False, True
                self._cond.wait(None if due is None else due[1] - now)
            if self._closed:
                return None
            key = next(iter(self._dirty))
            del self._dirty[key]
            forced = key in self._forced
            self._forced.discard(key)
            self._busy = key
            return key, forced, False

    def _loop(self) -> None:
        while True:
            item = self._next()
            if item is None:
                return
            key, forced, quiet = item
            try:
                self._maintain(key, forced, quiet)
            except Exception:  # noqa: BLE001 - maintenance must never stop; search stays correct without it
                log.exception("index maintenance failed for %s/%s", *key)
            finally:
                with self._cond:
                    self._busy = None
                    self._cond.notify_all()

    def _maintain(self, key: tuple[str, str], forced: bool, quiet: bool = False) -> None:
        for _ in range(8):  # re-plan: rows written during a job may call for the next one
            state = self._inspect(key)
            if state is None:
                return  # deleted
            action, reason = self.policy.plan(state, quiet=quiet)
            quiet = False  # once: a write during the fold starts a new quiet period
            if forced and state.rows > 0:
                action, reason, forced = Action.BUILD, "rebuild requested", False
            if action is Action.NONE:
                return
            result = self._run(key, action, reason, self._job_args(key, action, state))
            if result is None:
                return  # failed (logged) or closing: the next write schedules it again
            self._on_done(key, action, state, result)

    def _run(self, key: tuple[str, str], action: Action, reason: str, args: dict) -> dict | None:
        record = JobRecord(key, action, reason, time.time())
        log.info("index job %s for %s/%s: %s", action.value, *key, reason)
        with self._cond:
            if self._closed:
                return None
            self.running = record
            self._child = subprocess.Popen(
                [sys.executable, "-P", str(_BUILDER), json.dumps({**args, "action": action.value})],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            child = self._child
        out, _ = child.communicate()
        with self._cond:
            self._child = None
            self.running = None
            record.finished = time.time()
            self.history.append(record)
            del self.history[:-100]
        try:
            result = json.loads(out.strip().splitlines()[-1]) if out.strip() else {"error": f"exit {child.returncode}"}
        except ValueError:
            result = {"error": f"unreadable result: {out[-500:]!r}"}
        if child.returncode != 0 or "error" in result:
            record.error = str(result.get("error", f"exit {child.returncode}"))
            if not self._closed:
                log.warning("index job %s for %s/%s failed: %s", action.value, *key, record.error)
            return None
        record.result = result
        log.info("index job %s for %s/%s done in %.1f s: %s", action.value, *key, record.finished - record.started,
                 json.dumps(result))
        return result
