"""`JobStore`: jobs, their events and results in SQLite, so they survive a restart of the trainer."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragtune.errors import NotFound

QUEUED, VALIDATING, RUNNING = "QUEUED", "VALIDATING", "RUNNING"
SUCCEEDED, FAILED, CANCELLED = "SUCCEEDED", "FAILED", "CANCELLED"
FINAL_STATES = (SUCCEEDED, FAILED, CANCELLED)
UNFINISHED_STATES = (QUEUED, VALIDATING, RUNNING)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    client_request_id TEXT NOT NULL DEFAULT '',
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    problems TEXT NOT NULL DEFAULT '[]',
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0,
    metrics TEXT,
    adapter_path TEXT NOT NULL DEFAULT '',
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    create_time REAL NOT NULL,
    update_time REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_request ON jobs (tenant, client_request_id) WHERE client_request_id != '';
CREATE INDEX IF NOT EXISTS jobs_tenant ON jobs (tenant, create_time);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    time REAL NOT NULL,
    state TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    PRIMARY KEY (job_id, sequence)
);
"""


@dataclass(frozen=True)
class JobRecord:
    id: str
    tenant: str
    client_request_id: str
    spec: dict[str, Any]
    state: str
    error: str
    problems: list[dict[str, Any]]
    step: int
    total_steps: int
    metrics: dict[str, Any] | None
    adapter_path: str
    cancel_requested: bool
    create_time: float
    update_time: float

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES


@dataclass(frozen=True)
class EventRecord:
    sequence: int
    time: float
    state: str
    kind: str  # state_changed, progress, epoch_end, checkpoint_saved, final_metrics, message
    payload: dict[str, Any] = field(default_factory=dict)


def _job(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=row["id"],
        tenant=row["tenant"],
        client_request_id=row["client_request_id"],
        spec=json.loads(row["spec"]),
        state=row["state"],
        error=row["error"],
        problems=json.loads(row["problems"]),
        step=row["step"],
        total_steps=row["total_steps"],
        metrics=json.loads(row["metrics"]) if row["metrics"] else None,
        adapter_path=row["adapter_path"],
        cancel_requested=bool(row["cancel_requested"]),
        create_time=row["create_time"],
        update_time=row["update_time"],
    )


class JobStore:
    """Thread-safe; `subscribe` callbacks run after each event is committed (from any thread)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._listeners: list[Callable[[str], None]] = []

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def subscribe(self, listener: Callable[[str], None]) -> None:
        self._listeners.append(listener)

    def _notify(self, job_id: str) -> None:
        for listener in list(self._listeners):
            listener(job_id)

    def _append(self, job_id: str, state: str, kind: str, payload: dict, now: float) -> int:
        row = self._db.execute(
            "SELECT COALESCE(MAX(sequence), 0) + 1 FROM events WHERE job_id = ?", (job_id,)
        ).fetchone()
        self._db.execute(
            "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)", (job_id, row[0], now, state, kind, json.dumps(payload))
        )
        return row[0]

    def create(self, tenant: str, spec: dict[str, Any], client_request_id: str = "") -> tuple[JobRecord, bool]:
        """A new QUEUED job, or the tenant's existing job with this client_request_id (created False)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if client_request_id:
                    row = self._db.execute(
                        "SELECT * FROM jobs WHERE tenant = ? AND client_request_id = ?", (tenant, client_request_id)
                    ).fetchone()
                    if row is not None:
                        self._db.execute("COMMIT")
                        return _job(row), False
                job_id = "job-" + uuid.uuid4().hex[:16]
                now = time.time()
                self._db.execute(
                    "INSERT INTO jobs (id, tenant, client_request_id, spec, state, create_time, update_time)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (job_id, tenant, client_request_id, json.dumps(spec), QUEUED, now, now),
                )
                self._append(job_id, QUEUED, "state_changed", {"state": QUEUED}, now)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        self._notify(job_id)
        return self.get(job_id), True

    def get(self, job_id: str, tenant: str | None = None) -> JobRecord:
        """The job; NOT_FOUND when absent or owned by another tenant (which must not learn it exists)."""
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or (tenant is not None and row["tenant"] != tenant):
            raise NotFound(f"id: no job {job_id!r}")
        return _job(row)

    def list(self, tenant: str, state: str | None = None) -> list[JobRecord]:
        query, args = "SELECT * FROM jobs WHERE tenant = ?", [tenant]
        if state:
            query, args = query + " AND state = ?", args + [state]
        with self._lock:
            rows = self._db.execute(query + " ORDER BY create_time DESC, rowid DESC", args).fetchall()
        return [_job(r) for r in rows]

    def unfinished(self) -> list[JobRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE state IN (?, ?, ?) ORDER BY create_time, rowid", UNFINISHED_STATES
            ).fetchall()
        return [_job(r) for r in rows]

    def count_waiting(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM jobs WHERE state = ?", (QUEUED,)).fetchone()[0]

    def set_state(self, job_id: str, state: str, *, only_from: tuple[str, ...] | None = None, **fields: Any) -> bool:
        """Moves a job to `state` (with error, problems, metrics, adapter_path) and records the change.
        With only_from, does nothing unless the job is in one of those states; returns whether it moved."""
        now = time.time()
        sets = {"state": state, "update_time": now}
        for key, value in fields.items():
            sets[key] = json.dumps(value) if key in ("problems", "metrics") else value
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                current = self._db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if current is None or (only_from is not None and current["state"] not in only_from):
                    self._db.execute("COMMIT")
                    return False
                assignments = ", ".join(f"{k} = ?" for k in sets)
                self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*sets.values(), job_id))
                if current["state"] != state:
                    self._append(job_id, state, "state_changed", {"state": state}, now)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        self._notify(job_id)
        return True

    def record(
        self,
        job_id: str,
        kind: str,
        payload: dict[str, Any],
        *,
        step: int | None = None,
        total_steps: int | None = None,
    ) -> int:
        """Appends an event (and updates the job's step counters); returns its sequence number."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                state = self._db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()["state"]
                if step is not None or total_steps is not None:
                    self._db.execute(
                        "UPDATE jobs SET step = COALESCE(?, step), total_steps = COALESCE(?, total_steps),"
                        " update_time = ? WHERE id = ?",
                        (step, total_steps, now, job_id),
                    )
                sequence = self._append(job_id, state, kind, payload, now)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        self._notify(job_id)
        return sequence

    def request_cancel(self, job_id: str) -> None:
        """Remembers a cancel request, so a job whose trainer dies before it stops is not resumed."""
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET cancel_requested = 1, update_time = ? WHERE id = ?", (time.time(), job_id)
            )

    def events(self, job_id: str, after_sequence: int = 0) -> list[EventRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM events WHERE job_id = ? AND sequence > ? ORDER BY sequence", (job_id, after_sequence)
            ).fetchall()
        return [EventRecord(r["sequence"], r["time"], r["state"], r["kind"], json.loads(r["payload"])) for r in rows]
