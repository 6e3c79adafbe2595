"""End to end: a LoRA adapter trained by the trainer service loads and serves in the real generator,
both sharing the adapter registry under RAGTUNE_HOME."""

from __future__ import annotations

import grpc
import pytest

from ragtune.tenancy import tenant_metadata
from ragtune.v1 import common_pb2, generator_pb2, generator_pb2_grpc, trainer_pb2_grpc
from ragtune.v1 import trainer_pb2 as pb
from tests.test_trainer import as_jsonl, jeopardy, prompt_completion, states_of, upload, watch

TENANT = "e2e-tenant"
MARKER = "Ahoy"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trainer_stub(ragtune_home):
    from services.trainer.server import TrainerService
    from services.trainer.settings import TrainerSettings
    from tests.grpc_support import InProcessServer

    # Default data dir and registry: both under the session's RAGTUNE_HOME, which the generator reads.
    with InProcessServer(TrainerService, TrainerSettings(port=0, min_examples=4), "trainer") as server:
        with grpc.insecure_channel(server.address) as channel:
            yield trainer_pb2_grpc.TrainerServiceStub(channel)


def _generate(address: str, question: str, adapter: str = "") -> str:
    with grpc.insecure_channel(address) as channel:
        stub = generator_pb2_grpc.GeneratorServiceStub(channel)
        request = generator_pb2.GenerateRequest(
            input=generator_pb2.GenerationInput(
                chat=generator_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content=question)])
            ),
            sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=12),
            adapter=adapter,
        )
        return stub.Generate(request, metadata=tenant_metadata(TENANT), timeout=300).text


def test_a_lora_adapter_from_the_trainer_serves_in_the_generator(trainer_stub, generator_server):
    rows = prompt_completion(jeopardy(8, start=600), prefix=f"{MARKER}! ")
    upload(trainer_stub, "pirate", as_jsonl(rows), tenant=TENANT)
    hp = pb.Hyperparameters(
        epochs=12, batch_size=8, learning_rate=3e-3, max_seq_len=128, validation_fraction=0.1, lr_schedule="constant"
    )
    job = trainer_stub.CreateJob(
        pb.CreateJobRequest(
            spec=pb.JobSpec(
                adapter_name="pirate", dataset="pirate", lora=pb.LoraConfig(r=8, dropout=0.01), hyperparameters=hp
            )
        ),
        metadata=tenant_metadata(TENANT),
    ).job
    events = watch(trainer_stub, job.id, tenant=TENANT)
    assert states_of(events)[-1] == pb.JOB_STATE_SUCCEEDED

    question = jeopardy(1, start=700)[0]["Question"]
    base = _generate(generator_server.address, question)
    tuned = _generate(generator_server.address, question, adapter="pirate")
    assert not base.startswith(MARKER)
    assert tuned.startswith(MARKER), tuned
    assert _generate(generator_server.address, question, adapter="pirate/1") == tuned
