"""`JobStore`: fine-tuning jobs, their events and results in the control-plane database, claimed by
trainer workers under a lease so that any replica can run, watch or cancel any job."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, exc, func, insert, select, update

from ragtune.controlplane import leases
from ragtune.controlplane.database import Database
from ragtune.controlplane.leases import LeaseStatus
from ragtune.controlplane.schema import job_events, jobs
from ragtune.errors import NotFound

QUEUED, VALIDATING, RUNNING = "QUEUED", "VALIDATING", "RUNNING"
SUCCEEDED, FAILED, CANCELLED = "SUCCEEDED", "FAILED", "CANCELLED"
# Trained and published, waiting on its promotion gate's evaluation (run by a gateway, not a trainer).
EVALUATING = "EVALUATING"
FINAL_STATES = (SUCCEEDED, FAILED, CANCELLED)
UNFINISHED_STATES = (QUEUED, VALIDATING, RUNNING)  # what trainer workers claim


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
    worker_id: str = ""
    attempts: int = 0

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


def new_job_id() -> str:
    return "job-" + uuid.uuid4().hex[:16]


def _job(row) -> JobRecord:
    return JobRecord(
        id=row["id"], tenant=row["tenant"], client_request_id=row["client_request_id"] or "", spec=row["spec"],
        state=row["state"], error=row["error"], problems=row["problems"], step=row["step"],
        total_steps=row["total_steps"], metrics=row["metrics"], adapter_path=row["adapter_path"],
        cancel_requested=bool(row["cancel_requested"]), create_time=row["create_time"],
        update_time=row["update_time"], worker_id=row["worker_id"] or "", attempts=row["attempts"],
    )


class JobStore:
    """Thread-safe. `subscribe` callbacks run after this process commits an event (watchers in other
    replicas see it on their next poll)."""

    def __init__(self, database: Database):
        self.db = database
        self._listeners: list[Callable[[str], None]] = []

    def subscribe(self, listener: Callable[[str], None]) -> None:
        self._listeners.append(listener)

    def _notify(self, job_id: str) -> None:
        for listener in list(self._listeners):
            listener(job_id)

    def _append(self, c: Connection, job_id: str, state: str, kind: str, payload: dict, now: float) -> int:
        sequence = leases.next_sequence(c, jobs, job_id)
        c.execute(insert(job_events).values(job_id=job_id, sequence=sequence, time=now, state=state, kind=kind,
                                            payload=payload))
        return sequence

    # -- records ---------------------------------------------------------------------------------

    def create(self, tenant: str, spec: dict[str, Any], client_request_id: str = "",
               job_id: str | None = None) -> tuple[JobRecord, bool]:
        """A new QUEUED job, or the tenant's existing job with this client_request_id (created False).
        The unique constraint decides, so two replicas given the same id at once make one job.
        `job_id` (from `new_job_id()`) lets a caller prepare the job's files before it can be claimed."""
        job_id = job_id or new_job_id()
        now = time.time()
        try:
            with self.db.transaction() as c:
                c.execute(insert(jobs).values(
                    id=job_id, tenant=tenant, client_request_id=client_request_id or None, spec=spec, state=QUEUED,
                    error="", problems=[], step=0, total_steps=0, metrics=None, adapter_path="", last_sequence=0,
                    worker_id=None, lease_expires=0.0, attempts=0, cancel_requested=False,
                    create_time=now, update_time=now,
                ))
                self._append(c, job_id, QUEUED, "state_changed", {"state": QUEUED}, now)
        except exc.IntegrityError:
            if not client_request_id:
                raise
            return self.find_by_request(tenant, client_request_id), False
        self._notify(job_id)
        return self.get(job_id), True

    def find_by_request(self, tenant: str, client_request_id: str) -> JobRecord:
        with self.db.read() as c:
            row = c.execute(select(jobs).where(jobs.c.tenant == tenant, jobs.c.client_request_id == client_request_id)
                            ).mappings().first()
        if row is None:
            raise NotFound(f"client_request_id: no job {client_request_id!r}")
        return _job(row)

    def get(self, job_id: str, tenant: str | None = None) -> JobRecord:
        """The job; NOT_FOUND when absent or owned by another tenant (which must not learn it exists)."""
        with self.db.read() as c:
            row = c.execute(select(jobs).where(jobs.c.id == job_id)).mappings().first()
        if row is None or (tenant is not None and row["tenant"] != tenant):
            raise NotFound(f"id: no job {job_id!r}")
        return _job(row)

    def list(self, tenant: str, state: str | None = None) -> list[JobRecord]:
        query = select(jobs).where(jobs.c.tenant == tenant)
        if state:
            query = query.where(jobs.c.state == state)
        with self.db.read() as c:
            rows = c.execute(query.order_by(jobs.c.create_time.desc(), jobs.c.id.desc())).mappings().all()
        return [_job(r) for r in rows]

    def count_waiting(self) -> int:
        with self.db.read() as c:
            return c.execute(select(func.count()).select_from(jobs).where(jobs.c.state == QUEUED)).scalar_one()

    def set_state(self, job_id: str, state: str, *, only_from: tuple[str, ...] | None = None,
                  worker: str | None = None, **fields: Any) -> bool:
        """Moves a job to `state` (with error, problems, metrics, adapter_path) and records the change.
        With only_from, only from those states; with worker, only while that worker holds the lease
        (a worker that lost its lease must not finish a job another worker now runs). A final state
        ends the lease. Returns whether it moved."""
        now = time.time()
        with self.db.transaction() as c:
            query = select(jobs.c.state).where(jobs.c.id == job_id).with_for_update()
            if worker is not None:
                query = query.where(jobs.c.worker_id == worker)
            current = c.execute(query).scalar()
            if current is None or (only_from is not None and current not in only_from):
                return False
            values = {"state": state, "update_time": now, **fields}
            if state in FINAL_STATES:
                values.update(worker_id=None, lease_expires=0.0)
            c.execute(update(jobs).where(jobs.c.id == job_id).values(**values))
            if current != state:
                self._append(c, job_id, state, "state_changed", {"state": state}, now)
        self._notify(job_id)
        return True

    def record(self, job_id: str, kind: str, payload: dict[str, Any], *, step: int | None = None,
               total_steps: int | None = None) -> int:
        """Appends an event (and updates the job's step counters); returns its sequence number."""
        now = time.time()
        with self.db.transaction() as c:
            state = c.execute(select(jobs.c.state).where(jobs.c.id == job_id)).scalar_one()
            values: dict[str, Any] = {"update_time": now}
            if step is not None:
                values["step"] = step
            if total_steps is not None:
                values["total_steps"] = total_steps
            c.execute(update(jobs).where(jobs.c.id == job_id).values(**values))
            sequence = self._append(c, job_id, state, kind, payload, now)
        self._notify(job_id)
        return sequence

    def request_cancel(self, job_id: str) -> None:
        """Marks the job; the worker running it (on any replica) sees the mark at its next renewal."""
        with self.db.transaction() as c:
            c.execute(update(jobs).where(jobs.c.id == job_id).values(cancel_requested=True, update_time=time.time()))
        self._notify(job_id)

    def events(self, job_id: str, after_sequence: int = 0) -> list[EventRecord]:
        with self.db.read() as c:
            rows = c.execute(
                select(job_events).where(job_events.c.job_id == job_id, job_events.c.sequence > after_sequence)
                .order_by(job_events.c.sequence)
            ).mappings().all()
        return [EventRecord(r["sequence"], r["time"], r["state"], r["kind"], r["payload"]) for r in rows]

    # -- work ------------------------------------------------------------------------------------

    def claim(self, worker: str, lease_s: float) -> JobRecord | None:
        """The oldest job that is queued or whose worker's lease ran out, now leased to `worker`."""
        with self.db.transaction() as c:
            row = leases.claim_next(c, jobs, UNFINISHED_STATES, worker, lease_s)
        if row is None:
            return None
        return self.get(row["id"])

    def renew(self, job_id: str, worker: str, lease_s: float) -> LeaseStatus:
        with self.db.transaction() as c:
            return leases.renew(c, jobs, job_id, UNFINISHED_STATES, worker, lease_s)

    def release(self, job_id: str, worker: str) -> None:
        with self.db.transaction() as c:
            leases.release(c, jobs, job_id, worker)
