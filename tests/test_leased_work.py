"""The leased-work helper on both stores that use it (trainer jobs, evaluations), on SQLite and on a
real PostgreSQL: a claim is one worker's, renewals keep it and bring a client's cancel, a worker that
lost its lease is fenced (and the store refuses its writes), a hand-back frees the row at once, and
both heartbeats (thread, asyncio) keep the lease or stop the run."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from ragtune.controlplane import jobs, leased_work
from ragtune.controlplane.evaluations import EvaluationStore, LeaseLost
from ragtune.controlplane.jobs import JobStore
from ragtune.controlplane.leased_work import CANCEL, LOST, Hold, ThreadHeartbeat

SPEC = {"adapter_name": "a", "dataset": "d", "method": "lora", "lora": None, "hyperparameters": {}}


@dataclass
class Leased:
    store: JobStore | EvaluationStore
    create: Callable[[], str]  # a new claimable row's id
    write_as: Callable[[str, str], bool]  # a fenced write by that worker: whether the store took it
    handed_back_attempts: int  # a row's attempts after one claim and a clean hand-back


def _job_write(store: JobStore, job_id: str, worker: str) -> bool:
    return store.set_state(job_id, jobs.SUCCEEDED, worker=worker)


def _evaluation_write(store: EvaluationStore, evaluation_id: str, worker: str) -> bool:
    try:
        store.save_result(evaluation_id, worker, "base", 0, {"answer": worker}, {"answers_done": 1})
    except LeaseLost:
        return False
    return True


@pytest.fixture(params=["jobs", "evaluations"])
def leased(request, database) -> Leased:
    if request.param == "jobs":
        store = JobStore(database)
        return Leased(store, lambda: store.create("t", SPEC)[0].id,
                      lambda row, worker: _job_write(store, row, worker), handed_back_attempts=1)
    store = EvaluationStore(database)
    # A clean hand-back gives an evaluation's attempt back, so rolling restarts never use them up.
    return Leased(store, lambda: store.create("t", b"spec", {"questions": 1}).id,
                  lambda row, worker: _evaluation_write(store, row, worker), handed_back_attempts=0)


def _until(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return value


def test_a_claim_is_one_workers_and_a_hand_back_frees_it_at_once(leased):
    row = leased.create()
    claimed = leased_work.claim(leased.store, "w1", 3600)
    assert claimed.id == row and claimed.worker_id == "w1" and claimed.attempts == 1
    assert leased_work.claim(leased.store, "w2", 3600) is None  # held, for an hour
    hold = Hold(leased.store, row, "w1", 3600)
    assert hold.renew() and not hold.fenced and not hold.cancel_requested

    leased_work.hand_back(leased.store, row, "w2")  # only the holder can give it back
    assert leased_work.claim(leased.store, "w2", 3600) is None
    hold.hand_back()
    assert leased.store.get(row).attempts == leased.handed_back_attempts
    again = leased_work.claim(leased.store, "w2", 3600)  # at once, not after the hour
    assert again.id == row and again.worker_id == "w2"
    assert not hold.renew() and hold.lost and hold.fenced  # handed back: no longer w1's to write


def test_a_worker_that_lost_its_lease_is_fenced_and_the_store_refuses_its_writes(leased):
    row = leased.create()
    leased_work.claim(leased.store, "w1", 0.3)
    stale = Hold(leased.store, row, "w1", 0.3)
    taken = _until(lambda: leased_work.claim(leased.store, "w2", 3600))  # w1 stopped renewing
    assert taken.id == row and taken.attempts == 2
    assert not stale.renew() and stale.lost and stale.fenced
    before = leased.store.get(row)
    assert not leased.write_as(row, "w1")
    after = leased.store.get(row)
    assert (after.state, after.worker_id, after.update_time) == (before.state, "w2", before.update_time)
    assert Hold(leased.store, row, "w2", 3600).renew() and leased.write_as(row, "w2")  # the new holder writes


def test_a_cancel_arrives_with_the_next_renewal_and_the_hold_stays(leased):
    row = leased.create()
    leased_work.claim(leased.store, "w1", 3600)
    hold = Hold(leased.store, row, "w1", 3600)
    assert hold.renew() and not hold.cancel_requested
    leased.store.request_cancel(row)
    assert not hold.cancel_requested  # seen at a renewal, not before
    assert hold.renew() and hold.cancel_requested and not hold.fenced


def test_a_hold_not_renewed_for_two_thirds_of_its_lease_is_fenced_before_the_lease_ends(leased):
    row = leased.create()
    started = time.monotonic()
    leased_work.claim(leased.store, "w1", 0.6)
    hold = Hold(leased.store, row, "w1", 0.6)
    assert not hold.fenced
    _until(lambda: hold.fenced, timeout=5)  # as if every renewal had failed
    assert 0.4 <= time.monotonic() - started < 0.6 + 5
    assert not hold.lost  # nobody else took it: fenced by caution, not by loss


# Each heartbeat is tried with the store of the worker that runs it: the trainer beats from a thread,
# the gateway's evaluation worker from an asyncio task.

def test_the_thread_heartbeat_keeps_the_lease_past_its_length_and_ends_with_its_block(database):
    store = JobStore(database)
    row = store.create("t", SPEC)[0].id
    leased_work.claim(store, "w1", 0.6)
    hold = Hold(store, row, "w1", 0.6)
    with ThreadHeartbeat(hold, 0.2, name="test-heartbeat"):
        held_until = time.monotonic() + 1.5  # two and a half lease lengths
        while time.monotonic() < held_until:
            assert leased_work.claim(store, "w2", 3600) is None
            time.sleep(0.1)
        assert not hold.fenced
    assert _until(lambda: leased_work.claim(store, "w2", 3600)).id == row  # no heartbeat, no lease


@pytest.mark.parametrize("stop_by", [CANCEL, LOST])
def test_the_asyncio_heartbeat_stops_the_run_once_on_a_cancel_or_a_lost_lease(database, stop_by):
    store = EvaluationStore(database)
    row = store.create("t", b"spec", {"questions": 1}).id
    leased_work.claim(store, "w1", 3600)
    hold = Hold(store, row, "w1", 3600)
    stops: list[str] = []

    async def scenario() -> None:
        run = asyncio.create_task(asyncio.Event().wait())

        def stop(why: str) -> None:
            stops.append(why)
            run.cancel()

        heartbeat = asyncio.create_task(leased_work.renew_until_stopped(hold, 0.05, run, stop))
        await asyncio.sleep(0.2)
        assert not stops and not run.done()  # renewed a few times: nothing to stop for
        if stop_by == CANCEL:
            await asyncio.to_thread(store.request_cancel, row)
        else:
            await asyncio.to_thread(store.release, row, "w1")
            assert await asyncio.to_thread(leased_work.claim, store, "w2", 3600)
        await asyncio.wait_for(heartbeat, 5)
        await asyncio.gather(run, return_exceptions=True)
        assert run.cancelled()

    asyncio.run(scenario())
    assert stops == [stop_by]
