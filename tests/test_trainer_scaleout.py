"""Trainer replicas on one control plane, as real processes with real (tiny) training: a job whose
worker is killed is resumed by another replica from its checkpoint and publishes exactly one
adapter; a replica that shuts down hands its job over at once; one client_request_id sent to two
replicas at once makes one job; and a database restart costs no job. Every test counts what was
lost (nothing) and the adapters per job (one)."""

from __future__ import annotations

import signal
import threading
import time
from contextlib import ExitStack, contextmanager

import grpc
import pytest

from ragtune.controlplane import Database
from ragtune.controlplane.jobs import JobStore
from ragtune.tenancy import tenant_metadata
from ragtune.v1 import trainer_pb2 as pb
from ragtune.v1 import trainer_pb2_grpc
from tests.database_support import LocalPostgres, fresh_database
from tests.grpc_support import free_port, start_service_process, wait_serving
from tests.test_trainer import as_jsonl, get_job, jeopardy, of_kind, prompt_completion, states_of, upload, watch

TENANT = "scaleout"
LEASE_S = 5
pytestmark = pytest.mark.slow
# 10 steps of one example (12 examples, 2 held out); a checkpoint every 2 steps.
STEPPED = pb.Hyperparameters(epochs=1, batch_size=1, max_seq_len=96, checkpoint_every_steps=2,
                             validation_fraction=0.2, learning_rate=1e-3)
ENDLESS = pb.Hyperparameters(epochs=50, batch_size=2, max_seq_len=128, checkpoint_every_steps=1)
TINY = pb.Hyperparameters(epochs=1, batch_size=4, max_seq_len=96, validation_fraction=0.2)


class Replica:
    def __init__(self, name: str, proc, address: str):
        self.name, self.proc, self.address = name, proc, address
        self.channel = grpc.insecure_channel(address)
        self.stub = trainer_pb2_grpc.TrainerServiceStub(self.channel)

    def terminate(self) -> int:
        self.channel.close()
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)

    def kill(self) -> None:
        self.channel.close()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


@contextmanager
def replicas(tmp_path, database_url: str, names: list[str], lease_s: float = LEASE_S):
    """Trainer processes on one database and one artifact root, each with its own home and port."""
    with ExitStack() as stack:
        started = []
        for name in names:
            port = free_port()
            env = {
                "RAGTUNE_HOME": str(tmp_path / f"home-{name}"),
                "RAGTUNE_ARTIFACT_ROOT": str(tmp_path / "artifacts"),
                "RAGTUNE_DATABASE_URL": database_url,
                "RAGTUNE_TRAINER_PORT": str(port),
                "RAGTUNE_TRAINER_WORKER_ID": name,
                "RAGTUNE_TRAINER_LEASE_S": str(lease_s),
                "RAGTUNE_TRAINER_POLL_INTERVAL_S": "0.5",
                "RAGTUNE_TRAINER_MIN_EXAMPLES": "4",
                "RAGTUNE_TRAINER_TORCH_THREADS": "1",  # two replicas share the two cores
                "RAGTUNE_TRAINER_GRACE_PERIOD_S": "2",
                "RAGTUNE_LOG_FORMAT": "text",
            }
            proc = start_service_process("services.trainer", env, tmp_path / f"{name}.log")
            stack.callback(_stop, proc)
            started.append(Replica(name, proc, f"127.0.0.1:{port}"))
        for replica in started:  # started together: they warm up (and migrate) at the same time
            wait_serving(replica.address, "ragtune.v1.TrainerService", timeout=300, proc=replica.proc)
        yield started


def _stop(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except Exception:  # noqa: BLE001
            proc.kill()
            proc.wait()


def create(stub, name: str, hp, request_id: str = "", dataset: str = "qa"):
    spec = pb.JobSpec(adapter_name=name, dataset=dataset, hyperparameters=hp)
    request = pb.CreateJobRequest(spec=spec, client_request_id=request_id)
    return stub.CreateJob(request, metadata=tenant_metadata(TENANT), timeout=60).job


def adapters_of(stub, job_id: str) -> list:
    listed = stub.ListAdapters(pb.ListAdaptersRequest(), metadata=tenant_metadata(TENANT), timeout=30).adapters
    return [a for a in listed if a.job_id == job_id]


def watch_until_checkpoint(stub, job_id: str) -> list:
    seen = []
    stream = stub.WatchJob(pb.WatchJobRequest(id=job_id), metadata=tenant_metadata(TENANT), timeout=300)
    for response in stream:
        seen.append(response.event)
        if response.event.checkpoint_saved_step >= 2:
            stream.cancel()
            break
    assert of_kind(seen, "checkpoint_saved_step"), get_job(stub, job_id, tenant=TENANT).error
    return seen


def assert_resumed_from_checkpoint(events: list) -> int:
    """Training resumed from a checkpoint (the last one recorded, or a later one whose event the
    outage swallowed) and went on from the step after it; returns that checkpoint's step."""
    resumed = [i for i, e in enumerate(events) if e.WhichOneof("event") == "message"
               and e.message.startswith("resumed from the checkpoint at step ")]
    assert resumed, [str(e) for e in events]
    at = resumed[-1]
    step = int(events[at].message.rsplit(" ", 1)[-1])
    recorded = [e.checkpoint_saved_step for e in events[:at] if e.WhichOneof("event") == "checkpoint_saved_step"]
    assert recorded and step >= recorded[-1] >= 2
    first_step_after = [e.progress.step for e in events[at:] if e.WhichOneof("event") == "progress"][0]
    assert first_step_after == step + 1, "a resumed run goes on from the step after its checkpoint"
    return step


def test_one_client_request_id_sent_to_two_replicas_at_once_makes_one_job(tmp_path, postgres_server):
    with fresh_database(postgres_server) as url, replicas(tmp_path, url, ["trainer-a", "trainer-b"]) as (a, b):
        upload(a.stub, "qa", as_jsonl(prompt_completion(jeopardy(8, start=800))), tenant=TENANT)
        ids = []
        for attempt in range(4):
            barrier = threading.Barrier(2)
            found: dict[str, str] = {}

            def send(replica, request_id=f"same-{attempt}"):
                barrier.wait()
                found[replica.name] = create(replica.stub, "dup", ENDLESS, request_id).id

            threads = [threading.Thread(target=send, args=(r,)) for r in (a, b)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert found["trainer-a"] == found["trainer-b"], found
            ids.append(found["trainer-a"])
        listed = b.stub.ListJobs(pb.ListJobsRequest(), metadata=tenant_metadata(TENANT), timeout=30).jobs
        assert sorted(j.id for j in listed) == sorted(ids) and len(set(ids)) == 4  # one job per request id
        # Cancel from either replica, whichever runs (or queues) the job: all end CANCELLED.
        for i, job_id in enumerate(ids):
            (a, b)[i % 2].stub.CancelJob(pb.CancelJobRequest(id=job_id), metadata=tenant_metadata(TENANT), timeout=30)
        for job_id in ids:
            events = watch(a.stub, job_id, tenant=TENANT, timeout=120)
            assert states_of(events)[-1] == pb.JOB_STATE_CANCELLED
        assert not adapters_of(a.stub, ids[0]) and not a.stub.ListAdapters(
            pb.ListAdaptersRequest(), metadata=tenant_metadata(TENANT)).adapters


def test_a_killed_replicas_job_is_resumed_by_another_from_its_checkpoint(tmp_path, postgres_server):
    with fresh_database(postgres_server) as url, replicas(tmp_path, url, ["trainer-a", "trainer-b"]) as pair:
        a, b = pair
        store = JobStore(Database(url))
        upload(a.stub, "qa", as_jsonl(prompt_completion(jeopardy(12, start=400))), tenant=TENANT)
        job = create(b.stub, "survivor", STEPPED)  # the upload on a is visible to b
        seen = watch_until_checkpoint(a.stub, job.id)
        owner_name = store.get(job.id).worker_id
        owner, survivor = (a, b) if owner_name == a.name else (b, a)
        assert owner_name == owner.name
        started = time.monotonic()
        owner.kill()

        after = watch(survivor.stub, job.id, tenant=TENANT, after=seen[-1].sequence, timeout=300)
        took = time.monotonic() - started
        events = seen + after
        assert_resumed_from_checkpoint(events)
        assert states_of(events)[-1] == pb.JOB_STATE_SUCCEEDED
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))  # nothing lost, nothing twice
        done = get_job(survivor.stub, job.id, tenant=TENANT)
        assert done.state == pb.JOB_STATE_SUCCEEDED and done.metrics.steps == 10
        record = store.get(job.id)
        assert record.attempts >= 2 and record.worker_id == ""  # claimed again after the kill
        published = adapters_of(survivor.stub, job.id)
        assert len(published) == 1 and done.adapter_path == published[0].registry_path  # one adapter per job
        listed = survivor.stub.ListJobs(pb.ListJobsRequest(), metadata=tenant_metadata(TENANT), timeout=30).jobs
        lost = [j.id for j in listed if j.state != pb.JOB_STATE_SUCCEEDED]
        assert [j.id for j in listed] == [job.id] and lost == []
        store.db.dispose()
        print(f"resumed after the kill and finished in {took:.1f} s (lease {LEASE_S} s)")


def test_a_replica_that_shuts_down_hands_its_job_over_at_once(tmp_path, postgres_server):
    # A lease far longer than the test: only the release on shutdown can explain a quick hand-over.
    with fresh_database(postgres_server) as url, replicas(tmp_path, url, ["trainer-a", "trainer-b"], 600) as pair:
        store = JobStore(Database(url))
        upload(pair[0].stub, "qa", as_jsonl(prompt_completion(jeopardy(12, start=400))), tenant=TENANT)
        job = create(pair[0].stub, "handed-over", STEPPED)
        seen = watch_until_checkpoint(pair[0].stub, job.id)
        owner, survivor = pair if store.get(job.id).worker_id == pair[0].name else pair[::-1]
        stopped_at = time.time()
        assert owner.terminate() == 0
        events = seen + watch(survivor.stub, job.id, tenant=TENANT, after=seen[-1].sequence, timeout=300)
        assert states_of(events)[-1] == pb.JOB_STATE_SUCCEEDED
        step = assert_resumed_from_checkpoint(events)
        resumed = [e for e in events if e.message == f"resumed from the checkpoint at step {step}"][-1]
        handed_over_s = resumed.time.ToNanoseconds() / 1e9 - stopped_at
        assert handed_over_s < 30, handed_over_s  # a released job is claimed at once, not after the lease
        record = store.get(job.id)
        assert record.attempts == 2 and len(adapters_of(survivor.stub, job.id)) == 1
        store.db.dispose()


def test_a_database_restart_loses_no_job(tmp_path):
    database = LocalPostgres(free_port())
    try:
        database.start()
        with replicas(tmp_path, database.url, ["trainer-solo"]) as (solo,):
            upload(solo.stub, "qa", as_jsonl(prompt_completion(jeopardy(12, start=400))), tenant=TENANT)
            running = create(solo.stub, "through-outage", STEPPED)
            queued = create(solo.stub, "after-outage", TINY)
            seen = watch_until_checkpoint(solo.stub, running.id)

            database.stop()
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:  # a hang would end DEADLINE_EXCEEDED
                solo.stub.GetJob(pb.GetJobRequest(id=running.id), metadata=tenant_metadata(TENANT), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
            assert time.monotonic() - started < 10, "a lost database must answer UNAVAILABLE quickly, not hang"
            time.sleep(LEASE_S)  # the running job meets the outage at its next step
            assert solo.proc.poll() is None

            database.start()
            deadline = time.monotonic() + 60
            while True:
                try:
                    get_job(solo.stub, running.id, tenant=TENANT)
                    break
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline
                    time.sleep(0.5)

            events = seen + watch(solo.stub, running.id, tenant=TENANT, after=seen[-1].sequence, timeout=300)
            assert states_of(events)[-1] == pb.JOB_STATE_SUCCEEDED
            assert_resumed_from_checkpoint(events)
            assert states_of(watch(solo.stub, queued.id, tenant=TENANT, timeout=300))[-1] == pb.JOB_STATE_SUCCEEDED
            listed = solo.stub.ListJobs(pb.ListJobsRequest(), metadata=tenant_metadata(TENANT), timeout=30).jobs
            assert sorted(j.id for j in listed) == sorted([running.id, queued.id])
            lost = [j.id for j in listed if j.state != pb.JOB_STATE_SUCCEEDED]
            assert lost == []
            assert [len(adapters_of(solo.stub, j)) for j in (running.id, queued.id)] == [1, 1]
    finally:
        database.destroy()
