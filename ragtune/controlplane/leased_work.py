"""The worker's side of leased work, one protocol for trainer jobs and evaluations: claim a row, hold it
with renewals that also bring a client's cancel, know when this worker is fenced off it, hand it back.

Each store keeps its own SQL (what a claim moves, whether a hand-back gives the attempt back; the
shared statements are in `leases`), and each worker keeps its concurrency model: the trainer renews
from a thread (`ThreadHeartbeat`), the gateway from an asyncio task (`renew_until_stopped`). A worker
that dies simply stops renewing: its lease runs out and the row becomes claimable again."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

from ragtune.controlplane.database import DatabaseUnavailable
from ragtune.controlplane.leases import LeaseStatus

log = logging.getLogger(__name__)

# Why a run stops: a client cancelled it (on any replica); this process is shutting down (hand the
# work back for another replica); the lease was lost (another worker may own the work: write nothing).
CANCEL, SHUTDOWN, LOST = "cancel", "shutdown", "lost"

Record = TypeVar("Record", covariant=True)


class LeasedStore(Protocol[Record]):
    """What a store of leased rows offers its workers (`JobStore`, `EvaluationStore`)."""

    def claim(self, worker: str, lease_s: float) -> Record | None: ...

    def renew(self, row_id: str, worker: str, lease_s: float) -> LeaseStatus: ...

    def release(self, row_id: str, worker: str) -> None: ...


def claim(store: LeasedStore[Record], worker: str, lease_s: float) -> Record | None:
    """The next claimable row, now leased to `worker`; None when there is none or when claiming failed
    (the caller waits for its next poll and tries again: a worker outlives any one failure)."""
    try:
        return store.claim(worker, lease_s)
    except DatabaseUnavailable:
        return None  # logged by the database
    except Exception:  # noqa: BLE001 - the worker must keep polling
        log.exception("claiming work as %s failed", worker)
        return None


def hand_back(store: LeasedStore, row_id: str, worker: str) -> None:
    """Gives the work back at once (a clean stop), so another worker need not wait out the lease; with
    the database away the lease runs out instead. Does nothing once `worker` no longer holds it."""
    try:
        store.release(row_id, worker)
    except DatabaseUnavailable:
        pass


class Hold:
    """One worker's hold on one claimed row, free of any concurrency model: `renew()`, called by whatever
    heartbeat the worker runs (and before a write that must not outlive the lease), records what the
    control plane answered. `lost` once another worker may own the row; `fenced` also when renewals
    have failed for too long to trust the lease; `cancel_requested` once a client asked it to stop."""

    def __init__(self, store: LeasedStore, row_id: str, worker: str, lease_s: float):
        self.store, self.row_id, self.worker, self.lease_s = store, row_id, worker, lease_s
        self._lost = threading.Event()
        self._cancel = threading.Event()
        self._last_held = time.monotonic()  # claimed just now

    def renew(self) -> bool:
        """Renews the lease now; False when this worker may no longer hold the row."""
        try:
            status = self.store.renew(self.row_id, self.worker, self.lease_s)
        except DatabaseUnavailable:
            log.warning("%s: cannot renew the lease: the database is unavailable", self.row_id)
            return not self.overdue()
        except Exception:  # noqa: BLE001 - a heartbeat must outlive any one failure
            log.exception("%s: renewing the lease failed", self.row_id)
            return not self.overdue()
        if not status.held:
            self._lost.set()
            return False
        self._last_held = time.monotonic()
        if status.cancel_requested:
            self._cancel.set()
        return True

    @property
    def lost(self) -> bool:
        """A renewal found the row no longer ours (expired and claimed, finished, or handed back)."""
        return self._lost.is_set()

    def overdue(self) -> bool:
        # Renewals have failed for two thirds of the lease: stop before it can run out under this run,
        # since another worker may claim the row then (a margin for clocks and slow steps).
        return time.monotonic() - self._last_held > self.lease_s * 2 / 3

    @property
    def fenced(self) -> bool:
        """This worker must write nothing more for the row: another may hold it, or soon may."""
        return self.lost or self.overdue()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """A cancel seen on this replica: stop without waiting for the next renewal to bring it."""
        self._cancel.set()

    def hand_back(self) -> None:
        hand_back(self.store, self.row_id, self.worker)


class ThreadHeartbeat:
    """Renews a hold every period_s from a daemon thread while its with-block runs."""

    def __init__(self, hold: Hold, period_s: float, name: str):
        self.hold, self.period_s = hold, period_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=name, daemon=True)

    def __enter__(self) -> ThreadHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._done.wait(self.period_s):
            self.hold.renew()


async def renew_until_stopped(hold: Hold, period_s: float, run: asyncio.Future,
                              stop: Callable[[str], None]) -> None:
    """The asyncio heartbeat: renews every period_s while `run` is not done. When a renewal finds the
    lease lost, or a client's cancel, it calls stop(LOST) or stop(CANCEL) once and returns (a second
    stop would interrupt what the run does on its way out). A failed renewal just waits for the next:
    the run's own writes are fenced by the store."""
    while not run.done():
        await asyncio.sleep(period_s)
        await asyncio.to_thread(hold.renew)
        if hold.lost:
            stop(LOST)
            return
        if hold.cancel_requested:
            stop(CANCEL)
            return
