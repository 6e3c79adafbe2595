"""The trainer's worker pool and leases on SQLite and PostgreSQL, with a stand-in for training: each
job runs once however many pools claim, a lost lease stops the run without touching the job, a
cancel mark reaches the run, and a pool that stops hands its job over at once."""

from __future__ import annotations

import threading
import time

import pytest

from ragtune.controlplane import jobs as states
from ragtune.controlplane.jobs import JobStore
from ragtune.registry import AdapterRegistry
from services.trainer.runner import JobRunner
from services.trainer.workers import CANCEL, LOST, SHUTDOWN, Lease, WorkerPool

SPEC = {"adapter_name": "a", "dataset": "d", "method": "lora", "lora": None, "hyperparameters": {}}


@pytest.fixture
def store(database):
    return JobStore(database)


def _wait(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_lease_reports_cancel_then_loss_and_a_fenced_runner_touches_nothing(store, tmp_path):
    job, _ = store.create("t", SPEC)
    store.claim("w1", lease_s=1.0)
    lease = Lease(store, job.id, "w1", 1.0, threading.Event())
    assert lease.renew() and lease.stop_reason() is None
    store.request_cancel(job.id)
    assert lease.renew() and lease.stop_reason() == CANCEL
    time.sleep(1.2)
    store.claim("w2", lease_s=60)
    assert not lease.renew() and lease.stop_reason() == LOST  # LOST wins: the job is not ours to cancel

    runner = JobRunner(store, AdapterRegistry(tmp_path / "adapters"), work_root=tmp_path / "work",
                       model_dir=tmp_path, min_examples=1)
    runner.work_dir(job.id).mkdir(parents=True)
    runner._finish(store.get(job.id), lease, states.CANCELLED)
    assert store.get(job.id).state == states.QUEUED and store.get(job.id).worker_id == "w2"
    assert runner.work_dir(job.id).exists(), "a worker that lost the lease removed the new owner's files"


def test_a_lease_not_renewed_for_two_thirds_of_its_time_stops_the_run(store):
    job, _ = store.create("t", SPEC)
    store.claim("w1", lease_s=1.0)
    lease = Lease(store, job.id, "w1", 1.0, threading.Event())
    assert lease.stop_reason() is None
    time.sleep(0.8)  # no heartbeat running: as if the database had not answered
    assert lease.stop_reason() == LOST


def test_pools_run_each_job_once_and_a_stopping_pool_hands_its_job_over(store):
    ran: list[tuple[str, str]] = []
    lock = threading.Lock()

    def execute(job, lease):
        with lock:
            ran.append((job.id, lease.worker))
        if job.spec["adapter_name"] == "long" and job.attempts == 1:
            _wait(lambda: lease.stop_reason() is not None)  # runs until its pool stops
            assert lease.stop_reason() == SHUTDOWN
            return
        time.sleep(0.05)  # long enough for every pool to get some of the jobs
        store.set_state(job.id, states.SUCCEEDED, worker=lease.worker)

    pools = [WorkerPool(store, execute, worker_id=f"replica-{i}", workers=2, lease_s=30, poll_interval_s=0.1)
             for i in range(3)]
    ids = [store.create("t", SPEC)[0].id for _ in range(12)]
    for pool in pools:
        pool.start()
    try:
        _wait(lambda: all(store.get(i).state == states.SUCCEEDED for i in ids))
        assert sorted(job_id for job_id, _ in ran) == sorted(ids), "a job ran twice or never"
        assert len({worker.split("/")[0] for _, worker in ran}) > 1  # shared out between replicas

        long_job = store.create("t", {**SPEC, "adapter_name": "long"})[0].id
        _wait(lambda: any(job_id == long_job for job_id, _ in ran))
        holder = store.get(long_job).worker_id.split("/")[0]
        started = time.monotonic()
        next(p for p in pools if p.worker_id == holder).stop()
        _wait(lambda: store.get(long_job).state == states.SUCCEEDED, timeout=10)
        assert time.monotonic() - started < 10  # released at once, not left for the 30 s lease
        runs = [worker.split("/")[0] for job_id, worker in ran if job_id == long_job]
        assert len(runs) == 2 and runs[1] != holder and store.get(long_job).attempts == 2
    finally:
        for pool in pools:
            pool.stop()
