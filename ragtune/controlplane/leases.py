"""Claiming work under a lease, for any table with the lease columns (jobs, evaluations).

A row is claimable while unfinished and its lease has expired (queued rows have none). The claim
locks the row with SELECT ... FOR UPDATE SKIP LOCKED on PostgreSQL, so concurrent workers take
different rows without waiting; on SQLite, BEGIN IMMEDIATE serializes the writers instead. A
worker renews its lease while it works; one that dies stops renewing, and the row becomes
claimable again when the lease runs out."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Table, select, update


@dataclass(frozen=True)
class LeaseStatus:
    held: bool  # False: the lease expired and someone else may hold the work now
    cancel_requested: bool


def claim_next(connection: Connection, table: Table, unfinished: tuple[str, ...], worker: str, lease_s: float,
               now: float | None = None) -> dict[str, Any] | None:
    """Claims the oldest claimable row for `worker`; returns its id and attempts before the claim."""
    now = time.time() if now is None else now
    statement = (
        select(table.c.id, table.c.attempts)  # not the whole row: specs can be large
        .where(table.c.state.in_(unfinished), table.c.lease_expires < now)
        .order_by(table.c.create_time, table.c.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    row = connection.execute(statement).mappings().first()
    if row is None:
        return None
    connection.execute(
        update(table)
        .where(table.c.id == row["id"])
        .values(worker_id=worker, lease_expires=now + lease_s, attempts=table.c.attempts + 1, update_time=now)
    )
    return dict(row)


def renew(connection: Connection, table: Table, row_id: str, unfinished: tuple[str, ...], worker: str,
          lease_s: float) -> LeaseStatus:
    now = time.time()
    held = connection.execute(
        update(table)
        .where(table.c.id == row_id, table.c.worker_id == worker, table.c.state.in_(unfinished))
        .values(lease_expires=now + lease_s)
    ).rowcount == 1
    cancel = connection.execute(select(table.c.cancel_requested).where(table.c.id == row_id)).scalar()
    return LeaseStatus(held=held, cancel_requested=bool(cancel))


def release(connection: Connection, table: Table, row_id: str, worker: str) -> None:
    """Gives the work back at once (a graceful stop), so another worker need not wait for the lease."""
    connection.execute(
        update(table).where(table.c.id == row_id, table.c.worker_id == worker).values(worker_id=None, lease_expires=0.0)
    )


def next_sequence(connection: Connection, table: Table, row_id: str) -> int:
    """The next event number of a row: an atomic increment, so two writers never take the same one."""
    return connection.execute(
        update(table).where(table.c.id == row_id).values(last_sequence=table.c.last_sequence + 1)
        .returning(table.c.last_sequence)
    ).scalar_one()
