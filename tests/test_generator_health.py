"""The generator's health follows its engine, and its load leaves the process as metrics.

- A real generator process whose vLLM engine core is killed: readiness (the named service) and
  liveness ("") turn NOT_SERVING within seconds, the stream in flight ends UNAVAILABLE, and new
  requests are answered UNAVAILABLE at once instead of hanging (the suite's one extra engine start).
- The health decision (dead engine, hung engine) and the load gauges on a stand-in engine.
- The load gauges on the session's real engine while a stream runs.
"""

from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ragtune.server import ServiceHealth
from ragtune.tenancy import tenant_metadata
from ragtune.v1 import common_pb2, generator_pb2, generator_pb2_grpc
from services.generator.engine import ENGINE_DEAD, EngineLoad
from tests.conftest import GENERATOR_TEST_TENANT
from tests.grpc_support import free_port, start_service_process, wait_serving

SERVICE = "ragtune.v1.GeneratorService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
MD = tenant_metadata(GENERATOR_TEST_TENANT)
COUNTING = "Count from 1 to 500, separated by commas: 1, 2, 3, 4, 5,"


def long_stream_request(max_tokens: int = 400) -> generator_pb2.GenerateStreamRequest:
    return generator_pb2.GenerateStreamRequest(
        input=generator_pb2.GenerationInput(prompt=COUNTING),
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens),
    )


# --- the health decision and the gauges, on a stand-in engine ------------------------------------


class StandInEngine:
    max_model_len = 2048

    def __init__(self):
        self.errored = False
        self.unfinished = 0
        self.stalled_s = 0.0
        self.current = EngineLoad()

    def unfinished_requests(self) -> int:
        return self.unfinished

    def seconds_since_progress(self) -> float:
        return self.stalled_s

    def load(self) -> EngineLoad:
        return self.current


class StandInCore:
    in_flight = 0


def stand_in_service(**settings):
    from services.generator.server import GeneratorService
    from services.generator.settings import GeneratorSettings

    service = GeneratorService(GeneratorSettings(port=0, **settings))
    service.engine, service.generator = StandInEngine(), StandInCore()
    return service


def run(coro):
    import asyncio

    return asyncio.run(coro)


def test_health_is_ready_while_the_engine_serves_and_unrecoverable_once_it_died():
    service = stand_in_service()
    assert run(service.health()) == ServiceHealth(ready=True)
    service.engine.errored = True
    report = run(service.health())
    assert (report.ready, report.live, report.reason) == (False, False, ENGINE_DEAD)


def test_an_engine_that_holds_requests_without_output_is_taken_as_hung():
    service = stand_in_service(engine_stall_timeout_s=60)
    service.engine.unfinished, service.engine.stalled_s = 3, 59.0
    assert run(service.health()).ready
    service.engine.stalled_s = 61.0
    report = run(service.health())
    assert not report.ready and not report.live and "3 requests" in report.reason and "61 s" in report.reason


def test_an_engine_not_started_is_not_ready():
    service = stand_in_service()
    service.engine = None
    assert run(service.health()).ready is False


def test_load_gauges_report_queue_depth_running_and_kv_cache():
    """Queue depth = admitted requests not in the running batch; the gauges go out through the
    OpenTelemetry SDK under the names the collector's Prometheus exporter publishes."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from services.generator import metrics as generator_metrics

    service = stand_in_service()
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    generator_metrics.register(service, provider.get_meter("test"))
    service.generator.in_flight, service.engine.unfinished = 7, 7
    service.engine.current = EngineLoad(running=4, waiting=3, kv_cache_usage=0.625)

    values = collected(reader)
    assert values == {
        "ragtune.generator.queue.depth": 3,
        "ragtune.generator.requests.running": 4,
        "ragtune.generator.requests.in_flight": 7,
        "ragtune.generator.kv_cache.usage": 0.625,
        "ragtune.generator.engine.healthy": 1,
    }
    service.engine.errored = True
    assert collected(reader)["ragtune.generator.engine.healthy"] == 0
    provider.shutdown()


def collected(reader) -> dict[str, float]:
    data = reader.get_metrics_data()
    return {
        m.name: m.data.data_points[0].value
        for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
    }


# --- the gauges on the session's real engine ----------------------------------------------------


@pytest.mark.slow
def test_real_engine_load_while_a_stream_runs(generator_server):
    """While a stream generates, one request runs and the KV cache holds its tokens; after it, zeros."""
    from services.generator import metrics as generator_metrics

    service = generator_server.service
    seen = []

    async def probe():
        return generator_metrics.snapshot(service)

    with grpc.insecure_channel(generator_server.address) as channel:
        stub = generator_pb2_grpc.GeneratorServiceStub(channel)
        for i, _ in enumerate(stub.GenerateStream(long_stream_request(48), metadata=MD, timeout=120)):
            if i in (8, 16, 24):
                seen.append(generator_server.call(probe()))
    assert all(s.in_flight == 1 and s.running == 1 and s.queue_depth == 0 for s in seen), seen
    assert all(0 < s.kv_cache_usage <= 1 for s in seen), seen
    deadline = time.monotonic() + 10
    while generator_server.call(probe()).in_flight and time.monotonic() < deadline:
        time.sleep(0.1)
    idle = generator_server.call(probe())
    assert (idle.in_flight, idle.running, idle.queue_depth, idle.kv_cache_usage, idle.healthy) == (0, 0, 0, 0.0, True)


# --- a real generator process whose engine dies ---------------------------------------------------


def health_of(stub, service: str) -> int | None:
    try:
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=3).status
    except grpc.RpcError:
        return None


@pytest.mark.slow
def test_killing_the_engine_turns_health_and_requests_unavailable(tmp_path):
    import psutil

    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {
        "RAGTUNE_GENERATOR_PORT": str(port), "RAGTUNE_HOME": str(tmp_path), "RAGTUNE_GENERATOR_GRACE_PERIOD_S": "2",
        "RAGTUNE_GENERATOR_KV_CACHE_SPACE_GIB": "1", "RAGTUNE_GENERATOR_MAX_NUM_SEQS": "4",
        "RAGTUNE_GRPC_HEALTH_CHECK_INTERVAL_S": "0.5",
    }
    log = tmp_path / "generator.log"
    proc = start_service_process("services.generator", env, log)
    try:
        wait_serving(address, SERVICE, timeout=600, proc=proc)
        channel = grpc.insecure_channel(address)
        health = health_pb2_grpc.HealthStub(channel)
        stub = generator_pb2_grpc.GeneratorServiceStub(channel)
        assert (health_of(health, ""), health_of(health, SERVICE)) == (SERVING, SERVING)

        # A stream in flight when the engine dies.
        outcome, streaming = {}, threading.Event()

        def stream():
            try:
                for _ in stub.GenerateStream(long_stream_request(), metadata=MD, timeout=120):
                    streaming.set()
                outcome["end"] = "finished"
            except grpc.RpcError as exc:
                outcome["end"] = exc.code()
                outcome["details"] = exc.details()
            outcome["at"] = time.monotonic()

        worker = threading.Thread(target=stream, daemon=True)
        worker.start()
        assert streaming.wait(60), "the stream produced nothing"

        cores = [c for c in psutil.Process(proc.pid).children(recursive=True) if c.name().startswith("VLLM::EngineCore")]
        assert len(cores) == 1, [c.name() for c in psutil.Process(proc.pid).children(recursive=True)]
        killed_at = time.monotonic()
        cores[0].send_signal(signal.SIGKILL)

        worker.join(30)
        assert outcome.get("end") == grpc.StatusCode.UNAVAILABLE, outcome
        assert outcome["at"] - killed_at < 10 and "engine has stopped" in outcome["details"]

        deadline = time.monotonic() + 15
        while (health_of(health, ""), health_of(health, SERVICE)) != (NOT_SERVING, NOT_SERVING):
            assert time.monotonic() < deadline, "health did not follow the dead engine"
            time.sleep(0.2)
        flipped_s = time.monotonic() - killed_at

        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            stub.Generate(
                generator_pb2.GenerateRequest(input=generator_pb2.GenerationInput(prompt="Hello"),
                                              sampling=common_pb2.SamplingParams(max_tokens=4)),
                metadata=MD, timeout=60,
            )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "engine has stopped" in refused.value.details()
        assert time.monotonic() - started < 5, "a request to a dead engine must be refused, not wait"
        print(f"health NOT_SERVING {flipped_s:.1f} s after the engine core was killed")
        assert "reports itself unrecoverable" in log.read_text()
        channel.close()

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
