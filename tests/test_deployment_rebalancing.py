"""Traffic reaches a replica that starts after the gateway connected, without restarting the gateway.

Two retriever replicas listen on the same loopback address (127.0.0.1:P, SO_REUSEPORT enabled for
this test only): as behind a Kubernetes Service, a *new connection* may land on either, while a
connection already open stays with the replica it reached. The gateway's own channel (gateway.
downstream.Downstream, `dns:///localhost:P`, round_robin) connects while only the first replica
runs. Because the servers close each connection after max_connection_age (GOAWAY), the gateway
reconnects, and new connections reach the second replica; without it (the control) the second
replica never sees a call. The same reconnection is what makes gRPC resolve a headless Service's
name again (measured with GRPC_TRACE: "requesting re-resolution" on every GOAWAY), so pods the
autoscaler adds get calls within the bound documented in k8s/README.md.
"""

from __future__ import annotations

import asyncio
import collections
import time

import grpc
import pytest

from ragtune.server import HostSettings
from ragtune.v1 import retriever_pb2
from tests.grpc_support import InProcessServer, free_port

AGE_S = 1.0  # the servers' max_connection_age in this test (30 s by default)


class CallCounter(grpc.aio.ServerInterceptor):
    """Counts the retriever RPCs one replica receives (health checks not included)."""

    def __init__(self, counts: collections.Counter, replica: str):
        self._counts, self._replica = counts, replica

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith("/ragtune.v1.RetrieverService/"):
            self._counts[self._replica] += 1
        return await continuation(handler_call_details)


def retriever_replica(port: int, data_dir, counts, replica: str, age_s: float) -> InProcessServer:
    from services.retriever.server import RetrieverService
    from services.retriever.settings import RetrieverSettings

    return InProcessServer(
        RetrieverService, RetrieverSettings(port=port, data_dir=data_dir), f"retriever-{replica}",
        extra_interceptors=[CallCounter(counts, replica)],
        host_settings=HostSettings(max_connection_age_s=age_s), reuse_port=True,
    )


async def call_until(downstream, counts, replica: str, seconds: float) -> float | None:
    """Calls ListCollections through the gateway's channel every 50 ms for up to `seconds`; returns
    how long it took until `replica` received a call (None if it never did)."""
    from gateway.downstream import CallBudget

    started = time.monotonic()
    while time.monotonic() - started < seconds:
        budget = CallBudget(tenant="rebalance", deadline=time.monotonic() + 10)
        await downstream.retriever.list_collections(retriever_pb2.ListCollectionsRequest(), budget)
        if counts[replica]:
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    return None


def gateway_downstream(port: int):
    from gateway.downstream import Downstream

    unused = f"127.0.0.1:{free_port()}"
    return Downstream(f"dns:///localhost:{port}", unused, unused, internal_token=None,
                      retry_attempts=1, retry_backoff_s=0.1)


@pytest.mark.parametrize("age_s,expect_second", [(AGE_S, True), (3600.0, False)], ids=["max-connection-age", "control"])
def test_second_replica_gets_calls_after_it_starts(tmp_path, age_s, expect_second):
    port = free_port()
    counts: collections.Counter = collections.Counter()
    first = retriever_replica(port, tmp_path / "a", counts, "first", age_s)
    second = None
    try:
        async def scenario():
            nonlocal second
            downstream = gateway_downstream(port)
            try:
                assert await call_until(downstream, counts, "first", 10) is not None
                for _ in range(10):
                    await call_until(downstream, counts, "never", 0.01)
                assert counts == {"first": 11}
                # The second replica starts (model load in a thread, so the first keeps serving).
                second = await asyncio.to_thread(retriever_replica, port, tmp_path / "b", counts, "second", age_s)
                before = counts["first"]
                waited = await call_until(downstream, counts, "second", 20 * AGE_S if expect_second else 4.0)
                return waited, counts["first"] - before
            finally:
                await downstream.close()

        waited, first_after = asyncio.run(scenario())
        if expect_second:
            assert waited is not None, f"the second replica got no call within {20 * AGE_S:.0f} s: {dict(counts)}"
            # gRPC jitters the age by +-10%; the kernel picks a listener per new connection (a hash of
            # its addresses and ports: about even odds), so a few reconnections may land on the first
            # replica before one reaches the second; 20 ages leave a one-in-a-million miss.
            print(f"second replica's first call {waited:.2f} s after it started (max_connection_age {AGE_S} s)")
        else:
            assert waited is None and counts["second"] == 0 and first_after > 0, dict(counts)
    finally:
        if second is not None:
            second.stop()
        first.stop()
