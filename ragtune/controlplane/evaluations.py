"""`EvaluationStore`: evaluations as records, claimed by whichever replica's worker is free (lease +
heartbeat), with per-question results saved as they finish so a replacement resumes, not restarts.

The store keeps the spec as the bytes the API received and the snapshot (progress, summaries,
verdict) as a JSON object: it does not know their schema (the gateway converts). The state and
error columns are authoritative; the snapshot carries neither.

`attempts` counts the claims that did not end in a hand-back: a run that raised, a replica that
died or lost its lease. A graceful hand-back (shutdown) gives its attempt back, so rolling
restarts never use up an evaluation's attempts; the worker ends it FAILED past its maximum."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, insert, select, update

from ragtune.controlplane import leases
from ragtune.controlplane.database import Database
from ragtune.controlplane.leases import LeaseStatus
from ragtune.controlplane.schema import evaluation_events, evaluation_results, evaluations
from ragtune.errors import NotFound

QUEUED, RUNNING = "QUEUED", "RUNNING"
SUCCEEDED, FAILED, CANCELLED = "SUCCEEDED", "FAILED", "CANCELLED"
FINAL_STATES = (SUCCEEDED, FAILED, CANCELLED)
UNFINISHED_STATES = (QUEUED, RUNNING)


def gate_evaluation_id(job_id: str) -> str:
    """The id of the evaluation a job's promotion gate waits on (one per job, whoever opens it)."""
    return f"gate-{job_id}"


def report_path(tenant: str, evaluation_id: str) -> str:
    """Where an evaluation's report lives, relative to the artifact root."""
    return f"evaluations/{tenant}/{evaluation_id}"


class LeaseLost(Exception):
    """This worker no longer holds the evaluation: another replica runs it now."""


class CancelRequested(Exception):
    """A client cancelled the evaluation: nothing more is saved, its worker ends it CANCELLED."""


@dataclass(frozen=True)
class EvaluationRecord:
    id: str
    tenant: str
    state: str
    spec: bytes
    snapshot: dict[str, Any]
    revision: int
    error: str
    knowledge_update: dict[str, Any] | None
    report_path: str
    worker_id: str
    attempts: int
    cancel_requested: bool
    create_time: float
    update_time: float

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES


def _record(row) -> EvaluationRecord:
    return EvaluationRecord(
        id=row["id"], tenant=row["tenant"], state=row["state"], spec=bytes(row["spec"]), snapshot=row["snapshot"],
        revision=row["revision"], error=row["error"], knowledge_update=row["knowledge_update"],
        report_path=row["report_path"], worker_id=row["worker_id"] or "", attempts=row["attempts"],
        cancel_requested=bool(row["cancel_requested"]), create_time=row["create_time"], update_time=row["update_time"],
    )


class EvaluationStore:
    def __init__(self, database: Database):
        self.db = database

    def _event(self, c: Connection, evaluation_id: str, kind: str, payload: dict[str, Any]) -> None:
        sequence = leases.next_sequence(c, evaluations, evaluation_id)
        c.execute(insert(evaluation_events).values(evaluation_id=evaluation_id, sequence=sequence, time=time.time(),
                                                   kind=kind, payload=payload))

    def _held(self, evaluation_id: str, worker: str):
        return (evaluations.c.id == evaluation_id, evaluations.c.worker_id == worker,
                evaluations.c.state.in_(UNFINISHED_STATES))

    def create(self, tenant: str, spec: bytes, snapshot: dict[str, Any], report_path_of=None,
               evaluation_id: str | None = None) -> EvaluationRecord:
        """A QUEUED evaluation. With a fixed evaluation_id, creating it twice gives the first one back
        (a promotion gate opened again by a trainer that died in between)."""
        if evaluation_id is not None:
            try:
                return self.get(evaluation_id, tenant)
            except NotFound:
                pass
        evaluation_id = evaluation_id or uuid.uuid4().hex[:12]
        now = time.time()
        report_path = report_path_of(tenant, evaluation_id) if report_path_of else ""
        snapshot = {**snapshot, "id": evaluation_id}
        with self.db.transaction() as c:
            c.execute(insert(evaluations).values(
                id=evaluation_id, tenant=tenant, state=QUEUED, spec=spec, snapshot=snapshot, revision=1, error="",
                knowledge_update=None, report_path=report_path, last_sequence=0, worker_id=None, lease_expires=0.0,
                attempts=0, cancel_requested=False, create_time=now, update_time=now))
            self._event(c, evaluation_id, "state_changed", {"state": QUEUED})
        return self.get(evaluation_id)

    def get(self, evaluation_id: str, tenant: str | None = None) -> EvaluationRecord:
        with self.db.read() as c:
            row = c.execute(select(evaluations).where(evaluations.c.id == evaluation_id)).mappings().first()
        if row is None or (tenant is not None and row["tenant"] != tenant):
            raise NotFound(f"id: no evaluation {evaluation_id!r}")
        return _record(row)

    def revision(self, evaluation_id: str) -> int:
        with self.db.read() as c:
            return c.execute(select(evaluations.c.revision).where(evaluations.c.id == evaluation_id)).scalar_one()

    def list(self, tenant: str) -> list[EvaluationRecord]:
        with self.db.read() as c:
            rows = c.execute(select(evaluations).where(evaluations.c.tenant == tenant)
                             .order_by(evaluations.c.create_time.desc(), evaluations.c.id.desc())).mappings().all()
        return [_record(r) for r in rows]

    # -- the worker's side -----------------------------------------------------------------------

    def claim(self, worker: str, lease_s: float) -> EvaluationRecord | None:
        """The oldest evaluation queued, or running with an expired lease, now RUNNING under `worker`."""
        with self.db.transaction() as c:
            row = leases.claim_next(c, evaluations, UNFINISHED_STATES, worker, lease_s)
            if row is None:
                return None
            c.execute(update(evaluations).where(evaluations.c.id == row["id"]).values(
                state=RUNNING, revision=evaluations.c.revision + 1))
            self._event(c, row["id"], "claimed", {"worker": worker, "attempt": row["attempts"] + 1})
        return self.get(row["id"])

    def renew(self, evaluation_id: str, worker: str, lease_s: float) -> LeaseStatus:
        with self.db.transaction() as c:
            return leases.renew(c, evaluations, evaluation_id, UNFINISHED_STATES, worker, lease_s)

    def release(self, evaluation_id: str, worker: str) -> None:
        """Hands the evaluation back (a shutdown): not a failed attempt, so its claim is not counted."""
        with self.db.transaction() as c:
            c.execute(update(evaluations).where(evaluations.c.id == evaluation_id, evaluations.c.worker_id == worker,
                                                evaluations.c.attempts > 0)
                      .values(attempts=evaluations.c.attempts - 1))
            leases.release(c, evaluations, evaluation_id, worker)

    def attempt_failed(self, evaluation_id: str, worker: str, error: str, retry_after_s: float) -> bool:
        """Records why this attempt failed and hands the evaluation back, claimable again after
        retry_after_s (the attempt stays counted). False if `worker` no longer held it."""
        with self.db.transaction() as c:
            moved = c.execute(update(evaluations).where(*self._held(evaluation_id, worker)).values(
                error=error, worker_id=None, lease_expires=time.time() + retry_after_s,
                revision=evaluations.c.revision + 1, update_time=time.time())).rowcount == 1
            if moved:
                attempt = c.execute(select(evaluations.c.attempts).where(evaluations.c.id == evaluation_id)).scalar()
                self._event(c, evaluation_id, "attempt_failed", {"attempt": attempt, "error": error})
        return moved

    def results(self, evaluation_id: str) -> dict[tuple[str, int], dict[str, Any]]:
        """Per-question results saved so far, by (arm, item index)."""
        with self.db.read() as c:
            rows = c.execute(select(evaluation_results).where(evaluation_results.c.evaluation_id == evaluation_id)).all()
        return {(r.arm, r.item_index): r.result for r in rows}

    def save_result(self, evaluation_id: str, worker: str, arm: str, item_index: int, result: dict[str, Any],
                    snapshot: dict[str, Any]) -> None:
        """Saves one answered question with the snapshot that counts it, only while `worker` holds the
        evaluation (raises LeaseLost otherwise) and no cancel was requested (raises CancelRequested:
        once a client cancels, no answer is added). A result already saved is kept, not doubled."""
        with self.db.transaction() as c:
            moved = c.execute(update(evaluations).where(
                *self._held(evaluation_id, worker), evaluations.c.cancel_requested.is_(False)).values(
                snapshot=snapshot, revision=evaluations.c.revision + 1, update_time=time.time())).rowcount
            if not moved:
                cancelled = c.execute(select(evaluations.c.cancel_requested).where(
                    *self._held(evaluation_id, worker))).scalar()
                raise CancelRequested(evaluation_id) if cancelled else LeaseLost(evaluation_id)
            exists = c.execute(select(evaluation_results.c.arm).where(
                evaluation_results.c.evaluation_id == evaluation_id, evaluation_results.c.arm == arm,
                evaluation_results.c.item_index == item_index)).first()
            if exists is None:
                c.execute(insert(evaluation_results).values(
                    evaluation_id=evaluation_id, arm=arm, item_index=item_index, result=result, worker_id=worker,
                    time=time.time()))

    def update_snapshot(self, evaluation_id: str, worker: str, snapshot: dict[str, Any], *,
                        knowledge_update: dict[str, Any] | None = None, event: tuple[str, dict] | None = None) -> None:
        with self.db.transaction() as c:
            values: dict[str, Any] = {"snapshot": snapshot, "revision": evaluations.c.revision + 1,
                                      "update_time": time.time()}
            if knowledge_update is not None:
                values["knowledge_update"] = knowledge_update
            if not c.execute(update(evaluations).where(*self._held(evaluation_id, worker)).values(**values)).rowcount:
                raise LeaseLost(evaluation_id)
            if event:
                self._event(c, evaluation_id, *event)

    def finish(self, evaluation_id: str, state: str, snapshot: dict[str, Any], error: str = "",
               worker: str | None = None, only_from: tuple[str, ...] = UNFINISHED_STATES) -> bool:
        """Moves to a final state (only from `only_from`; with worker, only while it holds the lease)."""
        conditions = [evaluations.c.id == evaluation_id, evaluations.c.state.in_(only_from)]
        if worker is not None:
            conditions.append(evaluations.c.worker_id == worker)
        with self.db.transaction() as c:
            moved = c.execute(update(evaluations).where(*conditions).values(
                state=state, snapshot=snapshot, error=error,
                revision=evaluations.c.revision + 1, worker_id=None, lease_expires=0.0,
                update_time=time.time())).rowcount == 1
            if moved:
                self._event(c, evaluation_id, "state_changed", {"state": state, "error": error})
        return moved

    def request_cancel(self, evaluation_id: str) -> None:
        with self.db.transaction() as c:
            c.execute(update(evaluations).where(evaluations.c.id == evaluation_id).values(cancel_requested=True))

    def events(self, evaluation_id: str) -> list[dict[str, Any]]:
        with self.db.read() as c:
            rows = c.execute(select(evaluation_events).where(evaluation_events.c.evaluation_id == evaluation_id)
                             .order_by(evaluation_events.c.sequence)).mappings().all()
        return [dict(r) for r in rows]



