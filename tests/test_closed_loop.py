"""The closed loop through the real gateway, trainer and generator: a gated job whose adapter beats
what the alias serves is promoted and served as "<name>@prod" by a second generator replica (its own
process, which never saw the adapter) without a load call; a job that does not beat it is held back
and the alias stays; moving the alias reaches that replica within its refresh bound; rollback restores
the previous version; every move is audited; another tenant can neither read nor move the alias."""

from __future__ import annotations

import json
import os
import time

import grpc
import pytest

from ragtune.controlplane.api_keys import new_key_entry
from ragtune.tenancy import tenant_metadata
from ragtune.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, generator_pb2, generator_pb2_grpc
from ragtune.v1 import trainer_pb2 as pb
from tests.grpc_support import InProcessServer, free_port, start_service_process, wait_serving
from tests.test_trainer import as_jsonl, jeopardy, prompt_completion

pytestmark = pytest.mark.slow
TENANT, MARKER, ADAPTER = "loop", "Ahoy", "pirate-gated"


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    """A second generator replica, its own process on the same registry and control plane (the test
    session's RAGTUNE_HOME), started first so its engine warms up while the first job trains."""
    port = free_port()
    env = {
        "RAGTUNE_GENERATOR_PORT": str(port), "RAGTUNE_HOME": os.environ["RAGTUNE_HOME"],
        "RAGTUNE_GENERATOR_KV_CACHE_SPACE_GIB": "1", "RAGTUNE_GENERATOR_MAX_NUM_SEQS": "2",
        "RAGTUNE_GENERATOR_ALIAS_REFRESH_S": "1",
    }
    proc = start_service_process("services.generator", env, tmp_path_factory.mktemp("replica") / "generator.log")
    try:
        yield f"127.0.0.1:{port}", proc
    finally:
        proc.terminate()
        proc.wait(60)


@pytest.fixture(scope="module")
def loop(generator_server, replica):
    from gateway.server import GatewayService
    from gateway.settings import GatewaySettings
    from services.trainer.server import TrainerService
    from services.trainer.settings import TrainerSettings

    keys = {"admin": new_key_entry(TENANT, ["admin"]), "rival": new_key_entry("rival", ["admin"])}
    with InProcessServer(TrainerService, TrainerSettings(port=0, min_examples=4), "trainer") as trainer:
        settings = GatewaySettings(
            port=0, api_keys=json.dumps({"keys": [entry for _, entry in keys.values()]}),
            retriever_address=trainer.address,  # no retriever needed: the gate runs without retrieval
            generator_address=generator_server.address, trainer_address=trainer.address,
            poll_interval_s=0.2)
        with InProcessServer(GatewayService, settings, "gateway") as gateway:
            channel = grpc.insecure_channel(gateway.address)
            auth = {name: (("authorization", f"Bearer {key}"),) for name, (key, _) in keys.items()}
            yield gateway_pb2_grpc.GatewayServiceStub(channel), auth
            channel.close()


ROWS = jeopardy(8, start=600)
EVAL_SET = "\n".join(json.dumps({"id": f"q{i}", "question": f"{r['Category'].title()}: {r['Question']}",
                                 "answers": [MARKER]}) for i, r in enumerate(ROWS)).encode()


def _gated_job(stub, auth, epochs: int) -> pb.Job:
    spec = pb.JobSpec(
        adapter_name=ADAPTER, dataset="pirate", lora=pb.LoraConfig(r=8, dropout=0.01),
        hyperparameters=pb.Hyperparameters(epochs=epochs, batch_size=8, learning_rate=3e-3, max_seq_len=128,
                                           validation_fraction=0.1, lr_schedule="constant"),
        gate=pb.PromotionGate(eval_set=EVAL_SET, alias="prod", margin=0.02, metric=pb.GATE_METRIC_TOKEN_F1))
    job = stub.CreateJob(gateway_pb2.GatewayServiceCreateJobRequest(request=pb.CreateJobRequest(spec=spec)),
                         metadata=auth, timeout=60).response.job
    events = [r.response.event for r in stub.WatchJob(gateway_pb2.GatewayServiceWatchJobRequest(
        request=pb.WatchJobRequest(id=job.id)), metadata=auth, timeout=1200)]
    states = [e.state_changed for e in events if e.WhichOneof("event") == "state_changed"]
    assert states[-2:] == [pb.JOB_STATE_EVALUATING, pb.JOB_STATE_SUCCEEDED], states
    return stub.GetJob(gateway_pb2.GatewayServiceGetJobRequest(request=pb.GetJobRequest(id=job.id)),
                       metadata=auth, timeout=30).response.job


def _alias(stub, auth, tenant_auth=None):
    return stub.GetAdapterAlias(gateway_pb2.GatewayServiceGetAdapterAliasRequest(
        request=pb.GetAdapterAliasRequest(adapter=ADAPTER, alias="prod")), metadata=tenant_auth or auth,
        timeout=30).response


def _served(generator_address: str, adapter: str) -> generator_pb2.GenerateStreamResponse:
    with grpc.insecure_channel(generator_address) as channel:
        stub = generator_pb2_grpc.GeneratorServiceStub(channel)
        request = generator_pb2.GenerateStreamRequest(
            input=generator_pb2.GenerationInput(chat=generator_pb2.ChatMessages(messages=[common_pb2.ChatMessage(
                role="user", content=f"{ROWS[0]['Category'].title()}: {ROWS[0]['Question']}")])),
            sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=8), adapter=adapter)
        parts = list(stub.GenerateStream(request, metadata=tenant_metadata(TENANT), timeout=300))
    return parts, "".join(p.delta for p in parts)


@pytest.mark.timeout(1800)  # two real training runs and two gate evaluations on 2 CPU cores
def test_a_gate_promotes_a_better_adapter_and_holds_back_one_that_is_not(loop, replica):
    stub, auth = loop
    replica_address, replica_proc = replica
    admin = auth["admin"]
    with pytest.raises(grpc.RpcError) as err:  # a bad gate is refused before anything trains
        stub.CreateJob(gateway_pb2.GatewayServiceCreateJobRequest(request=pb.CreateJobRequest(spec=pb.JobSpec(
            adapter_name=ADAPTER, dataset="pirate", gate=pb.PromotionGate(eval_set=b"not json\n", alias="Prod")))),
            metadata=admin, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "eval_set" in err.value.details() and "line 1" in err.value.details() and "alias" in err.value.details()

    rows = prompt_completion(ROWS, prefix=f"{MARKER}! ")
    stub.UploadDataset(iter([gateway_pb2.GatewayServiceUploadDatasetRequest(request=pb.UploadDatasetRequest(
        name="pirate", content=as_jsonl(rows)))]), metadata=admin, timeout=60)

    first = _gated_job(stub, admin, epochs=12)
    v = first.gate_verdict
    print(f"first job: {v.reason}")
    assert v.promoted and v.candidate_version == 1 and v.incumbent_version == 0 and v.evaluation_id
    assert v.improvement_ci_low > v.margin == pytest.approx(0.02)
    prod = _alias(stub, admin)
    assert [(t.version, t.weight) for t in prod.alias.targets] == [(1, 100)]
    assert [(e.action, e.actor) for e in prod.history] == [("promote", f"gate:{first.id}")]
    # The second replica never loaded this adapter and gets no load call: it resolves the alias itself.
    wait_serving(replica_address, timeout=900, proc=replica_proc)
    parts, text = _served(replica_address, f"{ADAPTER}@prod")
    assert parts[-1].adapter == f"{ADAPTER}/1" and text.startswith(MARKER), text
    report = stub.GetEvaluation(gateway_pb2.GetEvaluationRequest(id=v.evaluation_id, include_report=True),
                                metadata=admin, timeout=30)
    assert "candidate" in report.report_markdown and report.evaluation.reasons[0] == v.reason

    second = _gated_job(stub, admin, epochs=2)  # barely trained: no better than what prod serves
    v2 = second.gate_verdict
    print(f"second job: {v2.reason}")
    assert not v2.promoted and v2.candidate_version == 2 and v2.incumbent_version == 1
    assert v2.improvement_ci_low <= v2.margin and "held back" in v2.reason
    assert _alias(stub, admin).alias.revision == prod.alias.revision  # the alias did not move

    listed = stub.ListAdapters(gateway_pb2.GatewayServiceListAdaptersRequest(request=pb.ListAdaptersRequest()),
                               metadata=admin, timeout=30).response.adapters
    assert {(a.name, a.version): list(a.aliases) for a in listed if a.name == ADAPTER} == {
        (ADAPTER, 1): ["prod"], (ADAPTER, 2): []}


def _served_version(address: str, bound_s: float, expected: str) -> tuple[str, float]:
    """The version the replica serves for <name>@prod, polled until it is `expected` or bound_s passed."""
    started = time.monotonic()
    while True:
        adapter = _served(address, f"{ADAPTER}@prod")[0][-1].adapter
        waited = time.monotonic() - started
        if adapter == expected or waited > bound_s:
            return adapter, waited
        time.sleep(0.2)


def test_rollback_restores_the_previous_version_and_tenants_stay_apart(loop, replica):
    stub, auth = loop
    admin = auth["admin"]
    replica_address, replica_proc = replica
    wait_serving(replica_address, timeout=900, proc=replica_proc)
    moved = stub.SetAdapterAlias(gateway_pb2.GatewayServiceSetAdapterAliasRequest(request=pb.SetAdapterAliasRequest(
        adapter=ADAPTER, alias="prod", targets=[pb.AliasTarget(version=2)], reason="manual release")),
        metadata=admin, timeout=30).response.alias
    assert [t.version for t in moved.targets] == [2]
    # RAGTUNE_GENERATOR_ALIAS_REFRESH_S=1 on the replica: it serves the new target within about a second
    # (plus one generation), without a restart or a load call.
    served, waited = _served_version(replica_address, 10, f"{ADAPTER}/2")
    assert served == f"{ADAPTER}/2", f"still {served} after {waited:.1f} s"
    back = stub.RollbackAdapterAlias(gateway_pb2.GatewayServiceRollbackAdapterAliasRequest(
        request=pb.RollbackAdapterAliasRequest(adapter=ADAPTER, alias="prod", reason="regression")),
        metadata=admin, timeout=30).response.alias
    assert [t.version for t in back.targets] == [1] and back.revision == moved.revision + 1
    assert _served_version(replica_address, 10, f"{ADAPTER}/1")[0] == f"{ADAPTER}/1"
    history = _alias(stub, admin).history
    assert [e.action for e in history][-2:] == ["set", "rollback"]
    assert history[-1].actor.startswith("key-") and history[-1].reason == "regression"
    with pytest.raises(grpc.RpcError) as err:
        stub.SetAdapterAlias(gateway_pb2.GatewayServiceSetAdapterAliasRequest(request=pb.SetAdapterAliasRequest(
            adapter=ADAPTER, alias="prod", targets=[pb.AliasTarget(version=9)])), metadata=admin, timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "version 9" in err.value.details()
    for call in (lambda: _alias(stub, admin, auth["rival"]),
                 lambda: stub.SetAdapterAlias(gateway_pb2.GatewayServiceSetAdapterAliasRequest(
                     request=pb.SetAdapterAliasRequest(adapter=ADAPTER, alias="prod",
                                                       targets=[pb.AliasTarget(version=1)])),
                     metadata=auth["rival"], timeout=30)):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert [t.version for t in _alias(stub, admin).alias.targets] == [1]  # the rival moved nothing
