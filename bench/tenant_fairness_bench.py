"""Tenant fairness benchmark: tenant B's Chat latency (p95) while tenant A floods the same gateway with
concurrent Chat calls, against B's p95 alone (goal: within 1.5x), through the real gateway and the real
generator (vLLM), each under ServiceHost on its own port in this process.

Two gateway configurations run against the same generator, each measured alone then under the flood:
- fair: a few generator slots (`generation_slots`) and a per-tenant cap (`generation_per_tenant`), so A's
  flood waits behind itself at the gateway and the engine's batch stays small for B;
- open: the defaults (32 slots, no per-tenant cap): up to a full engine batch of A's calls run beside B's.

Run: .venv/bin/python -m bench.tenant_fairness_bench [--quick]; writes bench/results/tenant_fairness.json.
--quick: 6 calls of B, 6 flooding streams, 12-token answers (a few minutes, most of it the engine's start).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import threading
import time
from pathlib import Path

import grpc

from bench.common import summary, write_result

GOAL_RATIO = 1.5


class _Hosted:
    """A ragtune service under ServiceHost on a background loop, port 0."""

    def __init__(self, service, settings, name: str):
        from ragtune.server import ServiceHost

        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name=name).start()

        async def start():
            host = ServiceHost(service, settings, name=name)
            return host, await host.start()

        self.host, port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(timeout=900)
        self.address = f"127.0.0.1:{port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.host.stop(1), self.loop).result(timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)


def _chat_request(max_tokens: int, n: int):
    from ragtune.v1 import common_pb2, gateway_pb2

    return gateway_pb2.ChatRequest(conversation=gateway_pb2.ChatConversation(
        messages=[common_pb2.ChatMessage(role="user", content=f"Name one fact about the number {n}.")],
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0)))


def _gateway(name: str, generator: str, keys: str, home: Path, **fairness):
    from gateway.server import GatewayService
    from gateway.settings import GatewaySettings
    from tests.grpc_support import free_port

    dead = f"127.0.0.1:{free_port()}"
    settings = GatewaySettings(port=0, http_port=-1, api_keys=keys, generator_address=generator,
                               retriever_address=dead, trainer_address=dead, evaluation_workers=0,
                               RAGTUNE_DATABASE_URL=f"sqlite:///{home / f'{name}.sqlite3'}", **fairness)
    return _Hosted(GatewayService(settings), settings, "gateway")


def _measure(address: str, key_a: str, key_b: str, calls: int, flood: int, max_tokens: int) -> dict:
    from ragtune.v1 import gateway_pb2_grpc

    channel = grpc.insecure_channel(address)
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    b_md = (("authorization", f"Bearer {key_b}"),)
    a_md = (("authorization", f"Bearer {key_a}"),)

    def b_latencies() -> list[float]:
        found = []
        for n in range(calls):
            started = time.perf_counter()
            stub.Chat(_chat_request(max_tokens, n), metadata=b_md, timeout=600)
            found.append((time.perf_counter() - started) * 1000)
        return found

    stub.Chat(_chat_request(max_tokens, 0), metadata=b_md, timeout=600)  # warm the path before measuring
    alone = b_latencies()
    stop = threading.Event()
    a_done = []

    def flooder(i: int) -> None:
        while not stop.is_set():
            try:
                stub.Chat(_chat_request(max_tokens * 2, 1000 + i), metadata=a_md, timeout=600)
                a_done.append(1)
            except grpc.RpcError:
                pass  # refused or over a quota: the flood goes on

    threads = [threading.Thread(target=flooder, args=(i,), daemon=True) for i in range(flood)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # let the flood fill the engine before B measures
    flooded = b_latencies()
    stop.set()
    for t in threads:
        t.join(timeout=600)
    channel.close()
    alone_s, flooded_s = summary(alone), summary(flooded)
    return {"b_alone_ms": alone_s, "b_during_flood_ms": flooded_s, "a_calls_done": len(a_done),
            "p95_ratio": flooded_s["p95"] / alone_s["p95"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--calls", type=int, default=20, help="B's calls per measurement")
    parser.add_argument("--flood", type=int, default=16, help="A's concurrent callers")
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args(argv)
    if args.quick:
        args.calls, args.flood, args.max_tokens = 6, 6, 12

    from ragtune.controlplane.api_keys import new_key_entry
    from services.generator.server import GeneratorService
    from services.generator.settings import GeneratorSettings

    key_a, entry_a = new_key_entry("flooder", ["read"])
    key_b, entry_b = new_key_entry("quiet", ["read"])
    keys = json.dumps({"keys": [entry_a, entry_b]})
    home = Path(tempfile.mkdtemp(prefix="ragtune-fairness-"))
    gen_settings = GeneratorSettings(port=0, max_model_len=1024, kv_cache_space_gib=1, max_num_seqs=16,
                                     max_waiting_requests=64)
    generator = _Hosted(GeneratorService(gen_settings), gen_settings, "generator")
    results = {}
    try:
        for name, fairness in (("fair", {"generation_slots": 3, "generation_per_tenant": 2}), ("open", {})):
            gateway = _gateway(name, generator.address, keys, home, **fairness)
            try:
                results[name] = {"settings": fairness, **_measure(gateway.address, key_a, key_b, args.calls,
                                                                    args.flood, args.max_tokens)}
                print(name, json.dumps({k: v for k, v in results[name].items() if k != "settings"}))
            finally:
                gateway.stop()
    finally:
        generator.stop()
    write_result("tenant_fairness", {
        "quick": args.quick, "calls": args.calls, "flood": args.flood, "max_tokens": args.max_tokens,
        "goal_ratio": GOAL_RATIO, "met": results["fair"]["p95_ratio"] <= GOAL_RATIO, **results,
    })


if __name__ == "__main__":
    main()
