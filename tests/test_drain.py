"""Drain and roll without errors: SIGTERM to a gateway process and to a generator process while streams are
open; every stream that had started finishes with its last message, the process exits 0, and a call that
arrives after the signal is refused (UNAVAILABLE) rather than cut half-way."""

from __future__ import annotations

import json
from contextlib import contextmanager
import signal
import threading
import time

import grpc

from ragtune.controlplane.api_keys import new_key_entry
from ragtune.tenancy import tenant_metadata
from ragtune.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, generator_pb2, generator_pb2_grpc
from tests.conftest import GENERATOR_TEST_TENANT
from tests.grpc_support import free_port, start_service_process, wait_serving

COUNTING = "Count from 1 to 500, separated by commas: 1, 2, 3, 4, 5,"
STREAMS = 3


@contextmanager
def _process(module: str, env: dict[str, str], log):
    """A service process, killed if the test left it running."""
    proc = start_service_process(module, env, log)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _open_streams(start_stream, first_item: threading.Barrier) -> tuple[list[threading.Thread], list[dict]]:
    """Starts STREAMS streams, each in a thread; returns once every one has sent its first message."""
    outcomes: list[dict] = [{} for _ in range(STREAMS)]

    def consume(i: int) -> None:
        try:
            items = 0
            for item in start_stream():
                items += 1
                outcomes[i]["last"] = item
                if items == 1:
                    first_item.wait(timeout=120)
            outcomes[i]["end"], outcomes[i]["items"] = "finished", items
        except grpc.RpcError as exc:
            outcomes[i]["end"], outcomes[i]["details"] = exc.code(), exc.details()
        except threading.BrokenBarrierError:
            outcomes[i]["end"] = "no first message"

    threads = [threading.Thread(target=consume, args=(i,), daemon=True) for i in range(STREAMS)]
    for t in threads:
        t.start()
    first_item.wait(timeout=120)
    return threads, outcomes


def test_generator_serves_without_its_database_and_finishes_open_streams_on_sigterm(tmp_path, ragtune_home,
                                                                                    style_adapter):
    """As k8s/base/generator.yaml runs it (no migration at start): the control-plane database is down from the
    start, yet the generator starts, serves the base model and `name/version` adapters, and refuses only
    `name@alias` (which it never read) with UNAVAILABLE naming it. Then SIGTERM during streams."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {"RAGTUNE_GENERATOR_PORT": str(port), "RAGTUNE_HOME": str(tmp_path), "RAGTUNE_GENERATOR_GRACE_PERIOD_S": "120",
           "RAGTUNE_GENERATOR_KV_CACHE_SPACE_GIB": "1", "RAGTUNE_GENERATOR_MAX_NUM_SEQS": "4",
           # Nothing listens there: the database is down for the whole test.
           "RAGTUNE_DATABASE_URL": f"postgresql+psycopg://ragtune@127.0.0.1:{free_port()}/ragtune",
           "RAGTUNE_DATABASE_MIGRATE": "false", "RAGTUNE_ADAPTER_REGISTRY": str(ragtune_home / "adapters")}
    log = tmp_path / "generator.log"
    with _process("services.generator", env, log) as proc:
        wait_serving(address, "ragtune.v1.GeneratorService", timeout=600, proc=proc)
        channel = grpc.insecure_channel(address)
        stub = generator_pb2_grpc.GeneratorServiceStub(channel)
        md = tenant_metadata(GENERATOR_TEST_TENANT)
        for adapter in ("", f"{style_adapter.name}/{style_adapter.version}"):
            reply = stub.Generate(generator_pb2.GenerateRequest(
                input=generator_pb2.GenerationInput(prompt="Say hello."), adapter=adapter,
                sampling=common_pb2.SamplingParams(max_tokens=8, temperature=0.0)), metadata=md, timeout=120)
            assert reply.usage.completion_tokens > 0, adapter
        try:
            stub.Generate(generator_pb2.GenerateRequest(
                input=generator_pb2.GenerationInput(prompt="Say hello."), adapter=f"{style_adapter.name}@prod",
                sampling=common_pb2.SamplingParams(max_tokens=8)), metadata=md, timeout=60)
            raise AssertionError("an alias was resolved with no database")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE and f"{style_adapter.name}@prod" in exc.details()
        request = generator_pb2.GenerateStreamRequest(
            input=generator_pb2.GenerationInput(prompt=COUNTING),
            sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=96))
        threads, outcomes = _open_streams(lambda: stub.GenerateStream(request, metadata=md, timeout=300),
                                          threading.Barrier(STREAMS + 1))
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        with grpc.insecure_channel(address) as late:  # a new call after the signal is refused, not started
            try:
                generator_pb2_grpc.GeneratorServiceStub(late).Generate(
                    generator_pb2.GenerateRequest(input=generator_pb2.GenerationInput(prompt="Hi"),
                                                  sampling=common_pb2.SamplingParams(max_tokens=2)),
                    metadata=md, timeout=10)
                refused = None
            except grpc.RpcError as exc:
                refused = exc.code()
        for t in threads:
            t.join(240)
        assert [o.get("end") for o in outcomes] == ["finished"] * STREAMS, outcomes
        assert all(o["last"].HasField("usage") and o["last"].usage.completion_tokens > 8 for o in outcomes), outcomes
        assert refused == grpc.StatusCode.UNAVAILABLE
        assert proc.wait(timeout=180) == 0, log.read_text()[-3000:]
        channel.close()


def test_gateway_finishes_open_streams_on_sigterm(tmp_path, generator_server):
    port, key_and_entry = free_port(), new_key_entry(GENERATOR_TEST_TENANT, ["read"])
    key, entry = key_and_entry
    dead = f"127.0.0.1:{free_port()}"
    env = {"RAGTUNE_GATEWAY_PORT": str(port), "RAGTUNE_HOME": str(tmp_path), "RAGTUNE_GATEWAY_HTTP_PORT": "-1",
           "RAGTUNE_GATEWAY_API_KEYS": json.dumps({"keys": [entry]}), "RAGTUNE_GATEWAY_GRACE_PERIOD_S": "120",
           "RAGTUNE_GATEWAY_GENERATOR_ADDRESS": generator_server.address, "RAGTUNE_GATEWAY_RETRIEVER_ADDRESS": dead,
           "RAGTUNE_GATEWAY_TRAINER_ADDRESS": dead, "RAGTUNE_GATEWAY_EVALUATION_WORKERS": "0"}
    log = tmp_path / "gateway.log"
    with _process("gateway", env, log) as proc:
        address = f"127.0.0.1:{port}"
        wait_serving(address, "ragtune.v1.GatewayService", timeout=300, proc=proc)
        channel = grpc.insecure_channel(address)
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        auth = (("authorization", f"Bearer {key}"),)
        conversation = gateway_pb2.ChatConversation(messages=[common_pb2.ChatMessage(role="user", content=COUNTING)])
        conversation.sampling.max_tokens = 64
        conversation.sampling.temperature = 0.0
        threads, outcomes = _open_streams(
            lambda: stub.ChatStream(gateway_pb2.ChatStreamRequest(conversation=conversation), metadata=auth, timeout=300),
            threading.Barrier(STREAMS + 1))
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(240)
        assert [o.get("end") for o in outcomes] == ["finished"] * STREAMS, outcomes
        assert all(o["last"].WhichOneof("event") == "done" for o in outcomes), outcomes
        assert proc.wait(timeout=180) == 0, log.read_text()[-3000:]
        channel.close()
