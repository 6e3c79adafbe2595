"""Crash-resume: the trainer runs as a real process, is killed with SIGKILL after a checkpoint, and on
restart the job resumes from that checkpoint (not step 0) and succeeds."""

from __future__ import annotations

import signal

import grpc
import pytest

from ragtune.tenancy import tenant_metadata
from ragtune.v1 import trainer_pb2 as pb
from ragtune.v1 import trainer_pb2_grpc
from tests.grpc_support import free_port, start_service_process, wait_serving
from tests.test_trainer import as_jsonl, jeopardy, of_kind, prompt_completion, states_of, upload, watch

TENANT = "crash-tests"
pytestmark = pytest.mark.slow


def _start(tmp_path, port: int, log_name: str):
    env = {
        "RAGTUNE_HOME": str(tmp_path / "home"),
        "RAGTUNE_TRAINER_PORT": str(port),
        "RAGTUNE_TRAINER_MIN_EXAMPLES": "4",
        "RAGTUNE_TRAINER_GRACE_PERIOD_S": "2",
        "RAGTUNE_LOG_FORMAT": "text",
        # The killed process's lease must run out before the restarted one (a new worker) claims the job.
        "RAGTUNE_TRAINER_LEASE_S": "5",
    }
    proc = start_service_process("services.trainer", env, tmp_path / log_name)
    wait_serving(f"127.0.0.1:{port}", "ragtune.v1.TrainerService", timeout=300, proc=proc)
    return proc


def test_a_killed_trainer_resumes_its_job_from_the_last_checkpoint(tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    md = tenant_metadata(TENANT)
    proc = _start(tmp_path, port, "first.log")
    try:
        with grpc.insecure_channel(address) as channel:
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)
            upload(stub, "qa", as_jsonl(prompt_completion(jeopardy(8, start=400))), tenant=TENANT)
            hp = pb.Hyperparameters(
                epochs=1,
                batch_size=1,
                max_seq_len=96,
                checkpoint_every_steps=2,
                validation_fraction=0.2,
                learning_rate=1e-3,
            )
            job = stub.CreateJob(
                pb.CreateJobRequest(spec=pb.JobSpec(adapter_name="survivor", dataset="qa", hyperparameters=hp)),
                metadata=md,
            ).job
            seen = []
            for response in stub.WatchJob(pb.WatchJobRequest(id=job.id), metadata=md, timeout=600):
                seen.append(response.event)
                if response.event.checkpoint_saved_step >= 2:
                    break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert of_kind(seen, "checkpoint_saved_step"), [str(e) for e in seen]
    checkpoint_step = of_kind(seen, "checkpoint_saved_step")[-1]
    assert checkpoint_step == 2

    proc = _start(tmp_path, port, "second.log")
    try:
        with grpc.insecure_channel(address) as channel:
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)
            after = watch(stub, job.id, tenant=TENANT, after=seen[-1].sequence)
            resumed = [e.message for e in after if e.WhichOneof("event") == "message"]
            assert f"resumed from the checkpoint at step {checkpoint_step}" in resumed
            steps_after_restart = [p.step for p in of_kind(after, "progress")]
            # Steps past the checkpoint that the killed process had done are redone, from checkpoint + 1.
            assert steps_after_restart[0] == checkpoint_step + 1 and steps_after_restart[-1] == 7
            assert states_of(after)[-1] == pb.JOB_STATE_SUCCEEDED
            done = stub.GetJob(pb.GetJobRequest(id=job.id), metadata=md).job
            assert done.state == pb.JOB_STATE_SUCCEEDED and done.metrics.steps == 7
            adapter = stub.GetAdapter(pb.GetAdapterRequest(name="survivor"), metadata=md).adapter
            assert adapter.version == 1 and adapter.job_id == job.id
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
