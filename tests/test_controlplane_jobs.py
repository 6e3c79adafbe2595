"""The job store of the control plane on SQLite and on a real PostgreSQL: records and events,
idempotent creates, claims under a lease (one worker per job, however many claim at once),
expiry, renewal, fencing, release; and migrations run by several processes at once."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from ragtune.controlplane import Database
from ragtune.controlplane import jobs as states
from ragtune.controlplane.jobs import JobStore
from ragtune.errors import NotFound
from tests.grpc_support import REPO_ROOT

SPEC = {"adapter_name": "a", "dataset": "d", "method": "lora", "lora": None, "hyperparameters": {}}


@pytest.fixture
def store(database):
    return JobStore(database)


def test_create_get_list_and_events(store):
    first, created = store.create("t1", SPEC)
    second, _ = store.create("t1", {**SPEC, "adapter_name": "b"})
    store.create("t2", SPEC)
    assert created and first.state == states.QUEUED and first.spec == SPEC and first.attempts == 0
    assert store.get(first.id).id == first.id
    with pytest.raises(NotFound):
        store.get(first.id, tenant="t2")  # another tenant must not learn it exists
    assert [j.id for j in store.list("t1")] == [second.id, first.id]  # newest first
    assert [j.id for j in store.list("t1", states.QUEUED)] == [second.id, first.id]
    assert store.list("t1", states.RUNNING) == []
    assert store.count_waiting() == 3

    notified = []
    store.subscribe(notified.append)
    assert store.record(first.id, "progress", {"step": 1}, step=1, total_steps=4) == 2
    assert store.set_state(first.id, states.SUCCEEDED, metrics={"steps": 4}, adapter_path="t1/a/1")
    events = store.events(first.id)
    assert [(e.sequence, e.kind, e.state) for e in events] == [
        (1, "state_changed", states.QUEUED), (2, "progress", states.QUEUED), (3, "state_changed", states.SUCCEEDED),
    ]
    assert [e.sequence for e in store.events(first.id, after_sequence=2)] == [3]
    done = store.get(first.id)
    assert (done.step, done.total_steps, done.metrics, done.adapter_path) == (1, 4, {"steps": 4}, "t1/a/1")
    assert done.finished and notified == [first.id, first.id]
    assert not store.set_state(first.id, states.CANCELLED, only_from=states.UNFINISHED_STATES)


def test_the_same_client_request_id_makes_one_job_even_when_sent_at_once(store):
    job, created = store.create("t1", SPEC, "req-1")
    again, created_again = store.create("t1", SPEC, "req-1")
    assert created and not created_again and again.id == job.id
    other, created_other = store.create("t2", SPEC, "req-1")  # another tenant's request is its own
    assert created_other and other.id != job.id

    barrier = threading.Barrier(8)

    def create(_):
        barrier.wait()
        return store.create("t1", SPEC, "req-2")

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(create, range(8)))
    assert len({j.id for j, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert len([j for j in store.list("t1") if j.client_request_id == "req-2"]) == 1


def test_concurrent_claims_give_each_job_to_exactly_one_worker(store):
    created = {store.create("t", SPEC)[0].id for _ in range(24)}
    barrier = threading.Barrier(6)

    def drain(worker: str) -> list[str]:
        barrier.wait()
        mine = []
        while (job := store.claim(worker, lease_s=60)) is not None:
            assert job.worker_id == worker and job.attempts == 1
            mine.append(job.id)
        return mine

    with ThreadPoolExecutor(6) as pool:
        claimed = list(pool.map(drain, [f"w{i}" for i in range(6)]))
    every = [job_id for mine in claimed for job_id in mine]
    assert len(every) == len(set(every)), "a job was claimed twice"
    assert set(every) == created
    assert store.claim("late", lease_s=60) is None  # all held


def test_an_expired_lease_makes_the_job_claimable_again_and_attempts_count(store):
    job, _ = store.create("t", SPEC)
    assert store.claim("w1", lease_s=0.5).id == job.id
    assert store.claim("w2", lease_s=0.5) is None  # held
    time.sleep(0.7)
    again = store.claim("w2", lease_s=30)
    assert again.id == job.id and again.worker_id == "w2" and again.attempts == 2


def test_renew_reports_a_lost_lease_and_a_cancel_request(store):
    job, _ = store.create("t", SPEC)
    store.claim("w1", lease_s=0.3)
    status = store.renew(job.id, "w1", lease_s=0.3)
    assert status.held and not status.cancel_requested
    store.request_cancel(job.id)
    assert store.renew(job.id, "w1", lease_s=0.3).cancel_requested
    time.sleep(0.5)
    store.claim("w2", lease_s=30)
    lost = store.renew(job.id, "w1", lease_s=30)
    assert not lost.held and lost.cancel_requested
    assert store.renew(job.id, "w2", lease_s=30).held


def test_set_state_with_a_worker_fences_out_a_stale_one(store):
    job, _ = store.create("t", SPEC)
    store.claim("stale", lease_s=0.3)
    assert store.set_state(job.id, states.VALIDATING, worker="stale")
    time.sleep(0.5)
    assert store.claim("fresh", lease_s=30).id == job.id
    assert not store.set_state(job.id, states.FAILED, worker="stale", error="too late")
    assert store.get(job.id).state == states.VALIDATING
    assert store.set_state(job.id, states.SUCCEEDED, worker="fresh")
    done = store.get(job.id)
    assert done.state == states.SUCCEEDED and done.worker_id == ""  # a final state ends the lease
    assert store.claim("fresh", lease_s=30) is None  # finished work is never claimed


def test_release_makes_the_job_claimable_at_once(store):
    job, _ = store.create("t", SPEC)
    store.claim("w1", lease_s=3600)
    store.release(job.id, "someone-else")  # only the holder can give it back
    assert store.claim("w2", lease_s=60) is None
    store.release(job.id, "w1")
    again = store.claim("w2", lease_s=60)
    assert again.id == job.id and again.attempts == 2


def test_a_bad_database_url_names_the_variable():
    for url in ("not a url", "mysql://u@h/db", "sqlite://", "postgresql://u@h:5432/"):
        with pytest.raises(ValueError, match="RAGTUNE_DATABASE_URL"):
            Database(url)


def test_migrations_run_at_once_from_several_processes_end_at_head_once(postgres_server):
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from ragtune.controlplane.database import MIGRATIONS
    from tests.database_support import fresh_database

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(config).get_current_head()
    with fresh_database(postgres_server) as url:
        env = {**os.environ, "RAGTUNE_DATABASE_URL": url}
        procs = [
            subprocess.Popen([sys.executable, "-m", "ragtune.controlplane", "migrate", "--wait", "30"], cwd=REPO_ROOT,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(3)
        ]
        outputs = [p.communicate(timeout=120)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], outputs
        assert all(f"revision {head}" in out for out in outputs), outputs
        database = Database(url)
        try:
            assert database.migrate() == head  # again: nothing to do
            store = JobStore(database)
            assert store.create("t", SPEC)[1]
        finally:
            database.dispose()
