"""Traffic follows health: the gateway's channels watch each replica's grpc.health.v1 status (client-side
health checking), so a replica that reports itself not ready (what a generator whose engine died reports,
through ServiceHost) stops receiving calls within seconds, while the healthy one takes them all.

Two real trainer replicas (light to start) on two loopback ports, one gateway channel over both
(`ipv4:` with two addresses, as a headless Service resolves to two pods). Calls are not retried
(retry_attempts=1), so a call routed to the broken replica would fail and be counted."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.downstream import CallBudget, Downstream
from ragtune.errors import ServiceError
from ragtune.server import ServiceHealth
from ragtune.v1 import trainer_pb2
from services.trainer.server import TrainerService
from services.trainer.settings import TrainerSettings
from tests.grpc_support import InProcessServer, free_port


def _replica(tmp_path, name: str) -> InProcessServer:
    folder = tmp_path / name
    settings = TrainerSettings(port=0, data_dir=folder, RAGTUNE_DATABASE_URL=f"sqlite:///{tmp_path / 'cp.sqlite3'}")
    return InProcessServer(TrainerService, settings, f"trainer-{name}")


async def _calls(down: Downstream, seconds: float) -> tuple[int, int]:
    """(calls, failures) of ListAdapters sent every 20 ms for `seconds`."""
    calls = failures = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        calls += 1
        try:
            await down.trainer.list_adapters(trainer_pb2.ListAdaptersRequest(),
                                             CallBudget(tenant="acme", deadline=time.monotonic() + 5))
        except ServiceError:
            failures += 1
        await asyncio.sleep(0.02)
    return calls, failures


@pytest.mark.slow  # two real replicas and health probes on their own clock: 10 to 20 s here
def test_a_replica_that_turns_unhealthy_stops_getting_calls_within_5_s(tmp_path):
    with _replica(tmp_path, "a") as a, _replica(tmp_path, "b") as b:
        unused = f"127.0.0.1:{free_port()}"

        async def scenario():
            down = Downstream(unused, unused, f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}", internal_token=None,
                              retry_attempts=1, retry_backoff_s=0.1)
            try:
                before = await _calls(down, 1.0)
                # What the host does when a generator's engine dies: readiness NOT_SERVING, RPCs refused.
                b.call(b.host._apply(ServiceHealth(ready=False, reason="the engine died (test)")))
                during = await _calls(down, 5.0)
                after = await _calls(down, 3.0)
                return before, during, after
            finally:
                await down.close()

        before, during, after = asyncio.run(scenario())
        with grpc.insecure_channel(b.address) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="ragtune.v1.TrainerService"), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert before[1] == 0 and before[0] > 10
        # Within the first 5 s the channel sees the NOT_SERVING watch event and routes around the replica.
        assert after[0] > 50 and after[1] == 0, f"calls failed after the replica turned unhealthy: {after}"
        assert during[1] <= 2, f"failures while the channel caught up: {during}"
