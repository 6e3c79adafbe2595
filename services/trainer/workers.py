"""`WorkerPool`: threads that claim jobs from the control plane under a lease (queued ones, or ones
whose worker died), keep the lease alive while the job runs, and tell the run when it must stop. The
lease protocol itself (claim, renew, fence, hand back) is `ragtune.controlplane.leased_work`'s."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ragtune.controlplane import leased_work
from ragtune.controlplane.database import DatabaseUnavailable
from ragtune.controlplane.jobs import JobRecord, JobStore
from ragtune.controlplane.leased_work import CANCEL, LOST, SHUTDOWN, Hold, ThreadHeartbeat

log = logging.getLogger(__name__)


class Lease(Hold):
    """One worker's hold on one job. A heartbeat thread renews it every lease_s / 3; the run asks
    `stop_reason()` between steps: LOST (another worker may own the job now: touch nothing), CANCEL
    (a client asked, on any replica) or SHUTDOWN (this process is stopping: resume elsewhere)."""

    def __init__(self, store: JobStore, job_id: str, worker: str, lease_s: float, shutdown: threading.Event):
        super().__init__(store, job_id, worker, lease_s)
        self.job_id = job_id
        self._shutdown = shutdown
        self._heartbeat = ThreadHeartbeat(self, lease_s / 3, name=f"lease-{job_id}")

    def __enter__(self) -> Lease:
        self._heartbeat.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._heartbeat.__exit__(*exc)

    def stop_reason(self) -> str | None:
        if self.fenced:
            return LOST
        if self.cancel_requested:
            return CANCEL
        if self._shutdown.is_set():
            return SHUTDOWN
        return None


class WorkerPool:
    """`workers` threads, each claiming one job at a time and running it with `execute(job, lease)`.
    Idle workers look for claimable jobs every poll_interval_s, and at once after `wake()`."""

    def __init__(self, store: JobStore, execute: Callable[[JobRecord, Lease], None], *, worker_id: str,
                 workers: int, lease_s: float, poll_interval_s: float):
        self.store, self.execute = store, execute
        self.worker_id, self.workers = worker_id, workers
        self.lease_s, self.poll_interval_s = lease_s, poll_interval_s
        self._shutdown = threading.Event()
        self._wakeup = threading.Condition()
        self._generation = 0  # bumped by wake(), so a wake-up during a claim is not slept through
        self._running: dict[str, Lease] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for i in range(self.workers):
            # One name per thread: the lease fences one holder, and two threads are two holders.
            name = self.worker_id if self.workers == 1 else f"{self.worker_id}/{i}"
            thread = threading.Thread(target=self._work, args=(name,), name=f"trainer-worker-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 120.0) -> None:
        """Stops the running jobs at their next step and releases them, so another replica resumes
        them from their checkpoints at once instead of after the lease."""
        self._shutdown.set()
        self.wake()
        for thread in self._threads:
            thread.join(timeout)

    def wake(self) -> None:
        with self._wakeup:
            self._generation += 1
            self._wakeup.notify_all()

    def cancel_local(self, job_id: str) -> None:
        with self._lock:
            lease = self._running.get(job_id)
        if lease is not None:
            lease.cancel()

    def _idle(self, generation: int) -> None:
        with self._wakeup:
            self._wakeup.wait_for(lambda: self._generation != generation or self._shutdown.is_set(),
                                  self.poll_interval_s)

    def _work(self, worker: str) -> None:
        while not self._shutdown.is_set():
            generation = self._generation
            job = leased_work.claim(self.store, worker, self.lease_s)
            if job is None:
                self._idle(generation)
                continue
            self._run(job, worker)

    def _run(self, job: JobRecord, worker: str) -> None:
        log.info("job %s claimed by %s (attempt %d)", job.id, worker, job.attempts)
        lease = Lease(self.store, job.id, worker, self.lease_s, self._shutdown)
        with self._lock:
            self._running[job.id] = lease
        release = True
        try:
            with lease:
                self.execute(job, lease)
        except DatabaseUnavailable:
            # Not the job's fault: it stays unfinished, and when the database is back a worker
            # claims it again and resumes from its checkpoint.
            log.warning("job %s stopped: the database is unavailable; it resumes when it is back", job.id)
        except Exception:  # noqa: BLE001
            # A bug outside the run: keep the lease until it runs out, so the job is retried
            # after lease_s rather than in a tight loop.
            log.exception("job %s: the worker failed outside the run", job.id)
            release = False
        finally:
            with self._lock:
                self._running.pop(job.id, None)
        if release:
            # A finished job has no holder any more (this does nothing then); an unfinished one
            # (shutdown, lost lease or database) becomes claimable at once.
            lease.hand_back()
