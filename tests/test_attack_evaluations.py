"""Attacks on evaluations (issue #27, items 1 and 5), driving the gateway's real evaluation worker on
the real PostgreSQL control plane:

- an evaluation whose run always raises ends FAILED after its attempts, with the reason, instead of
  being resumed forever; replicas that die on it use its attempts up too; a shutdown does not;
- cancel ends a running evaluation within seconds on the replica that runs it (the generation in
  flight is aborted, no answer is saved after), and one whose replica died as soon as it is claimed;
- a `gate_run` that is not the named job's own gate (another tenant's job, a job not waiting on a
  gate, another version, another margin, another evaluation, no such job) moves no alias and ends
  no job: the evaluation ends FAILED with the reason, without asking a single question; the genuine
  gate still moves the alias, also when claimed before its trainer recorded the job EVALUATING, and
  a gate resumed after it ruled ends without ruling twice.

The generator is the session's real vLLM one for the cancel test; elsewhere it is an address where
nothing listens (its questions fail at once with UNAVAILABLE, which the run records per question).
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

from gateway.downstream import Downstream
from gateway.evaluation import convert
from gateway.evaluation.promotion import Promotion
from gateway.evaluation.service import EvaluationService
from gateway.evaluation.worker import EvaluationWorker
from gateway.rag import AnswerOptions, AskPipeline, TokenCounter
from ragtune.controlplane import Database
from ragtune.controlplane import evaluations as states
from ragtune.controlplane import jobs as job_states
from ragtune.controlplane.aliases import AliasStore, Target
from ragtune.controlplane.evaluations import EvaluationStore, gate_evaluation_id, report_path
from ragtune.controlplane.jobs import JobStore
from ragtune.models import base_model_dir
from ragtune.v1 import gateway_pb2
from services.trainer.convert import gate_evaluation_spec
from tests.database_support import fresh_database
from tests.grpc_support import free_port

TENANT, RIVAL, ADAPTER = "acme", "rival", "jeopardy-style"
WORKER = "attack-worker"
LEASE_S = 3.0  # heartbeats every second: what bounds how fast a cancel lands


def eval_set(questions: int, question: str = "What is {i} plus {i}?") -> str:
    return "\n".join(json.dumps({"id": f"q{i}", "question": question.format(i=i), "answers": [str(2 * i)]})
                     for i in range(questions))


def base_spec(questions: int, question: str = "What is {i} plus {i}?", max_tokens: int = 8) -> bytes:
    spec = gateway_pb2.EvaluationSpec(eval_set=eval_set(questions, question).encode(),
                                      arms=[gateway_pb2.EVALUATION_ARM_BASE])
    spec.sampling.temperature = 0.0
    spec.sampling.max_tokens = max_tokens
    return spec.SerializeToString()


@pytest.fixture
def control_plane(postgres_server):
    with fresh_database(postgres_server) as url:
        database = Database(url)
        database.migrate()
        yield database
        database.dispose()


@pytest.fixture(scope="module")
def token_counter():
    return TokenCounter(base_model_dir())


@asynccontextmanager
async def running_worker(database: Database, artifacts, token_counter, *, generator: str = "", max_attempts: int = 3):
    """The gateway's evaluation worker as GatewayService builds it, on this control plane."""
    dead = f"127.0.0.1:{free_port()}"
    downstream = Downstream(dead, generator or dead, dead, internal_token=None, retry_attempts=2,
                            retry_backoff_s=0.05)
    pipeline = AskPipeline(downstream, token_counter, default_top_k=4, max_top_k=20, default_max_tokens=64,
                           options=AnswerOptions())
    worker = EvaluationWorker(EvaluationStore(database), pipeline, downstream, artifacts,
                              Promotion(AliasStore(database), JobStore(database)), slots=1, lease_s=LEASE_S,
                              poll_interval_s=0.1, max_attempts=max_attempts, worker_id=WORKER)
    worker.start()
    try:
        yield worker
    finally:
        await worker.stop()
        await downstream.close()


async def until(probe, timeout_s: float, what: str):
    """Polls a blocking probe (a database read) until it returns something truthy, at most timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await asyncio.to_thread(probe)
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        await asyncio.sleep(0.05)


def finished(store: EvaluationStore, evaluation_id: str):
    record = store.get(evaluation_id)
    return record if record.finished else None


def kinds(store: EvaluationStore, evaluation_id: str, kind: str) -> list[dict]:
    return [e["payload"] for e in store.events(evaluation_id) if e["kind"] == kind]


# --- attempts ------------------------------------------------------------------------------------


def test_an_evaluation_whose_run_always_fails_ends_failed_after_its_attempts(control_plane, tmp_path,
                                                                              token_counter):
    artifacts = tmp_path / "artifacts"
    (artifacts / "evaluations").mkdir(parents=True)
    (artifacts / "evaluations" / TENANT).write_text("a file where the reports' folder goes")  # reports cannot be written
    store = EvaluationStore(control_plane)
    record = store.create(TENANT, base_spec(2), {"questions": 2, "answers_total": 2}, report_path)

    async def scenario():
        async with running_worker(control_plane, artifacts, token_counter, max_attempts=3):
            return await until(lambda: finished(store, record.id), 60, "the evaluation ends")

    started = time.monotonic()
    final = asyncio.run(scenario())
    print(f"ended {final.state} after {time.monotonic() - started:.1f} s: {final.error}")
    assert final.state == states.FAILED
    assert final.error.startswith("failed 3 times; the last error: NotADirectoryError")
    assert [p["attempt"] for p in kinds(store, record.id, "claimed")] == [1, 2, 3]
    assert [p["attempt"] for p in kinds(store, record.id, "attempt_failed")] == [1, 2]
    assert len(store.results(record.id)) == 2  # answered on the first attempt, never asked again
    assert store.claim("another-replica", 30) is None  # it stays ended: nobody resumes it any more


def test_replicas_that_die_on_an_evaluation_use_up_its_attempts_and_a_shutdown_does_not(control_plane, tmp_path,
                                                                                       token_counter):
    store = EvaluationStore(control_plane)
    record = store.create(TENANT, base_spec(2), {"questions": 2, "answers_total": 2}, report_path)

    async def scenario():
        for replica in ("dies-1", "shuts-down", "dies-2", "dies-3"):
            claimed = await until(lambda: store.claim(replica, 0.2), 10, f"{replica} claims it")
            assert claimed.id == record.id
            if replica == "shuts-down":  # a graceful hand-back: its attempt is given back
                await asyncio.to_thread(store.release, record.id, replica)
        assert (await asyncio.to_thread(store.get, record.id)).attempts == 3
        async with running_worker(control_plane, tmp_path / "artifacts", token_counter, max_attempts=3):
            return await until(lambda: finished(store, record.id), 30, "the evaluation ends")

    final = asyncio.run(scenario())
    assert final.state == states.FAILED
    assert final.error == "gave up after 3 attempts; the last: its replica stopped without finishing (the lease ran out)"
    assert store.results(record.id) == {}  # the worker that gave up asked nothing


# --- cancel --------------------------------------------------------------------------------------

COUNTING = "Count from 1 to 500, separated by commas ({i}): 1, 2, 3, 4, 5,"


@pytest.mark.slow
def test_cancel_stops_a_running_evaluation_within_seconds_and_saves_nothing_after(control_plane, tmp_path,
                                                                                  token_counter, generator_server):
    questions = 30
    store = EvaluationStore(control_plane)
    artifacts = tmp_path / "artifacts"
    record = store.create(TENANT, base_spec(questions, COUNTING, max_tokens=160),
                          {"questions": questions, "answers_total": questions}, report_path)

    def engine_busy() -> int:
        async def probe():
            return generator_server.service.engine.unfinished_requests()

        return generator_server.call(probe())

    async def scenario():
        async with running_worker(control_plane, artifacts, token_counter, generator=generator_server.address):
            await until(lambda: len(store.results(record.id)) >= 2, 600, "two answers are saved")
            await until(engine_busy, 60, "the next question is being generated")
            service = EvaluationService(store, None, artifacts, None, poll_interval_s=0.1)
            asked = time.monotonic()
            reply = await service.cancel(TENANT, record.id)
            took = time.monotonic() - asked
            saved = await asyncio.to_thread(store.results, record.id)
            await until(lambda: engine_busy() == 0, 10, "the generation in flight is aborted")
            return reply, took, saved

    reply, took, saved = asyncio.run(scenario())
    print(f"cancelled after {took:.2f} s with {len(saved)} of {questions} answers saved")
    assert reply.state == gateway_pb2.EVALUATION_STATE_CANCELLED and took < 5.0
    assert 2 <= len(saved) < questions
    assert store.results(record.id) == saved  # nothing saved after the cancel
    final = store.get(record.id)
    assert final.state == states.CANCELLED and convert.evaluation_message(final, artifacts).answers_done == len(saved)
    report = json.loads((artifacts / final.report_path / "results.json").read_text())
    assert len(report["arms"][0]["questions"]) == len(saved)


def test_cancelling_an_evaluation_whose_replica_died_ends_it_when_next_claimed(control_plane, tmp_path,
                                                                                token_counter):
    store = EvaluationStore(control_plane)
    record = store.create(TENANT, base_spec(2), {"questions": 2, "answers_total": 2}, report_path)
    assert store.claim("died", 0.5).id == record.id  # a replica claims it and dies at once

    async def scenario():
        async with running_worker(control_plane, tmp_path / "artifacts", token_counter):
            service = EvaluationService(store, None, tmp_path / "artifacts", None, poll_interval_s=0.1)
            return await service.cancel(TENANT, record.id)

    reply = asyncio.run(scenario())
    assert reply.state == gateway_pb2.EVALUATION_STATE_CANCELLED
    assert store.results(record.id) == {}  # cancelled before a question was asked


# --- forged promotion gates ----------------------------------------------------------------------

GATE_QUESTIONS = 2


def job_gate(margin: float) -> dict:
    """A job's promotion gate as the trainer stores it in the job's spec."""
    return {"eval_set": eval_set(GATE_QUESTIONS), "alias": "prod", "metric": "token_f1", "margin": margin,
            "collection": ""}


def published_job(jobs: JobStore, tenant: str, *, version: int = 2, state: str = job_states.EVALUATING,
                  margin: float = -2.0):
    """A job that trained `version` of ADAPTER and waits on its gate, as the trainer records it."""
    spec = {"adapter_name": ADAPTER, "dataset": "pirate", "method": "lora", "lora": None, "hyperparameters": {},
            "gate": job_gate(margin)}
    job, _ = jobs.create(tenant, spec)
    jobs.set_state(job.id, state, adapter_path=f"{tenant}/{ADAPTER}/{version}", metrics={"train_loss": 1.5})
    return jobs.get(job.id)


@dataclass
class Gate:
    tenant: str  # the evaluation's tenant
    spec: gateway_pb2.EvaluationSpec
    evaluation_id: str | None  # None: a random id, as the public CreateEvaluation gives


def genuine(job) -> Gate:
    """The gate the trainer opens for `job` (its own builder), candidate = the version it produced."""
    spec = gateway_pb2.EvaluationSpec.FromString(
        gate_evaluation_spec(job.id, ADAPTER, int(job.adapter_path.rsplit("/", 1)[1]), 1, job.spec["gate"]))
    return Gate(job.tenant, spec, gate_evaluation_id(job.id))


def another_tenants_job(jobs, mine, theirs) -> Gate:
    gate = genuine(theirs)
    return Gate(TENANT, gate.spec, None)


def a_job_not_waiting_on_a_gate(jobs, mine, theirs) -> Gate:
    ended = published_job(jobs, TENANT, state=job_states.SUCCEEDED)  # e.g. to re-run a gate that held it back
    return genuine(ended)


def another_version(jobs, mine, theirs) -> Gate:
    gate = genuine(mine)
    gate.spec.gate_run.candidate_version = 1  # what the job did not produce (e.g. to re-point prod at an old one)
    return gate


def another_margin(jobs, mine, theirs) -> Gate:
    honest = published_job(jobs, TENANT, margin=0.5)
    gate = genuine(honest)
    gate.spec.gate_run.gate.margin = -2.0  # the attack: a margin any candidate clears
    return gate


def another_evaluation(jobs, mine, theirs) -> Gate:
    gate = genuine(mine)
    return Gate(TENANT, gate.spec, None)  # the very gate_run, in an evaluation the job is not waiting on


def no_such_job(jobs, mine, theirs) -> Gate:
    gate = genuine(mine)
    gate.spec.gate_run.job_id = "job-0000000000000000"
    return Gate(TENANT, gate.spec, gate_evaluation_id("job-0000000000000000"))


def state_of(database: Database) -> dict:
    """Everything a gate could change: every alias with its history, every job with its events."""
    aliases, jobs = AliasStore(database), JobStore(database)
    return {
        "aliases": {(t, a.alias): (a.targets, a.revision, aliases.history(t, ADAPTER, a.alias))
                    for t in (TENANT, RIVAL) for a in aliases.list(t)},
        "jobs": {(t, j.id): (j.state, j.metrics, j.adapter_path, jobs.events(j.id))
                 for t in (TENANT, RIVAL) for j in jobs.list(t)},
    }


def run_gate(database: Database, artifacts, token_counter, gate: Gate, while_waiting=None):
    """Queues the gate's evaluation, runs the worker until it ends; `while_waiting` (blocking) runs
    once the worker says it waits for the gate's job."""
    store = EvaluationStore(database)
    record = store.create(gate.tenant, gate.spec.SerializeToString(),
                          {"questions": GATE_QUESTIONS, "answers_total": 2 * GATE_QUESTIONS}, report_path,
                          evaluation_id=gate.evaluation_id)

    async def scenario():
        async with running_worker(database, artifacts, token_counter):
            if while_waiting is not None:
                await until(lambda: kinds(store, record.id, "waiting"), 30, "the worker waits for the job")
                await asyncio.to_thread(while_waiting)
            return await until(lambda: finished(store, record.id), 60, "the gate's evaluation ends")

    return asyncio.run(scenario()), store.results(record.id)


@pytest.fixture
def gated(control_plane):
    """acme and rival each have ADAPTER@prod on version 1 and a job that published version 2 and waits
    on its gate (margin -2: any candidate the gate scores clears it)."""
    aliases, jobs = AliasStore(control_plane), JobStore(control_plane)
    for tenant in (TENANT, RIVAL):
        aliases.set(tenant, ADAPTER, "prod", [Target(1, 100)], actor="test")
    return jobs, published_job(jobs, TENANT), published_job(jobs, RIVAL)


def test_the_genuine_gate_is_accepted_and_moves_the_alias(control_plane, tmp_path, token_counter, gated):
    """The control for the refusals below: the trainer's own gate for the job is applied."""
    jobs, mine, _ = gated
    final, results = run_gate(control_plane, tmp_path / "artifacts", token_counter, genuine(mine))
    assert final.state == states.SUCCEEDED, final.error
    assert len(results) == 2 * GATE_QUESTIONS
    prod = AliasStore(control_plane).get(TENANT, ADAPTER, "prod")
    assert [(t.version, t.weight) for t in prod.targets] == [(2, 100)]
    job = jobs.get(mine.id)
    assert job.state == job_states.SUCCEEDED and job.metrics["gate_verdict"]["evaluation_id"] == final.id
    assert AliasStore(control_plane).get(RIVAL, ADAPTER, "prod").targets == (Target(1, 100),)


@pytest.mark.parametrize("forge", [another_tenants_job, a_job_not_waiting_on_a_gate, another_version, another_margin,
                                   another_evaluation, no_such_job], ids=lambda f: f.__name__)
def test_a_forged_gate_moves_no_alias_and_ends_no_job(control_plane, tmp_path, token_counter, gated, forge):
    jobs, mine, theirs = gated
    gate = forge(jobs, mine, theirs)
    before = state_of(control_plane)
    final, results = run_gate(control_plane, tmp_path / "artifacts", token_counter, gate)
    print(f"{forge.__name__}: {final.error}")
    assert final.state == states.FAILED and final.error.startswith("promotion refused:")
    assert "no alias moved" in final.error
    assert results == {}  # refused before a single question was asked
    assert state_of(control_plane) == before


def test_a_gate_claimed_before_its_trainer_records_the_job_evaluating_waits_for_it(control_plane, tmp_path,
                                                                                  token_counter, gated):
    """The trainer queues the gate's evaluation just before it records the job EVALUATING: a gateway
    that claims it in between waits for the job instead of refusing the genuine gate."""
    jobs, _, _ = gated
    publishing = published_job(jobs, TENANT, state=job_states.RUNNING)  # the same spec, its version not recorded
    gate = genuine(publishing)
    jobs.set_state(publishing.id, job_states.RUNNING, adapter_path="")

    def trainer_records_it() -> None:
        jobs.set_state(publishing.id, job_states.EVALUATING, adapter_path=f"{TENANT}/{ADAPTER}/2")

    final, results = run_gate(control_plane, tmp_path / "artifacts", token_counter, gate, trainer_records_it)
    assert final.state == states.SUCCEEDED, final.error
    (waited,) = kinds(EvaluationStore(control_plane), final.id, "waiting")
    assert "RUNNING" in waited["reason"] and "EVALUATING" in waited["reason"]
    assert len(results) == 2 * GATE_QUESTIONS
    assert AliasStore(control_plane).get(TENANT, ADAPTER, "prod").targets == (Target(2, 100),)
    assert jobs.get(publishing.id).state == job_states.SUCCEEDED


def test_a_gate_resumed_after_it_ruled_ends_succeeded_and_changes_nothing_more(control_plane, tmp_path,
                                                                              token_counter, gated):
    """A replica that applied the verdict and died before recording the evaluation's end: the next one
    finds the job already ended by this very evaluation, and neither refuses nor rules twice."""
    jobs, mine, _ = gated
    gate = genuine(mine)
    first, _ = run_gate(control_plane, tmp_path / "artifacts", token_counter, gate)
    assert first.state == states.SUCCEEDED, first.error
    with control_plane.transaction() as c:  # back to how the dead replica left it: ruled, not yet ended
        c.exec_driver_sql("UPDATE evaluations SET state = 'RUNNING', worker_id = 'died', lease_expires = 0"
                          " WHERE id = %(id)s", {"id": first.id})
    before = state_of(control_plane)
    store = EvaluationStore(control_plane)

    async def scenario():
        async with running_worker(control_plane, tmp_path / "artifacts", token_counter):
            return await until(lambda: finished(store, first.id), 60, "the resumed gate ends")

    resumed = asyncio.run(scenario())
    assert resumed.state == states.SUCCEEDED, resumed.error
    assert state_of(control_plane) == before
