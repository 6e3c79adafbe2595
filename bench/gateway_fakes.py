"""Instant stand-ins for the retriever and generator, and a gateway served in a chosen configuration,
each in its own process: with downstream calls that cost (almost) nothing, what remains of an Ask is
the gateway's own time, and configurations that differ in one thing (tracing, interceptors) show
what that thing costs.

`python -m bench.gateway_fakes fakes` serves both stand-ins; `python -m bench.gateway_fakes gateway
VARIANT RETRIEVER GENERATOR` serves a gateway (variants: telemetry = as deployed, with tracing and
metrics; no-telemetry = the ragtune interceptors only; bare = no interceptors). Each prints
"PORT <n>" when ready and serves until its stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

FAKE_TOKENS = 16
QUESTION = "Who invented the Brannock process?"
VARIANTS = ("bare", "no-telemetry", "telemetry")


def _hits():
    from clients.samples import wiki100_articles
    from ragtune.v1 import retriever_pb2

    fact = ("The Brannock process turns crushed seaweed into a clear, durable plastic. It was invented in 1931 by "
            "Edith Sorrel, a chemist from the port of Gannet Bay.")
    texts = [fact] + [text[i:i + 800] for _, text in wiki100_articles(4) for i in (2000, 6000)][:7]
    return [retriever_pb2.SearchHit(chunk_id=f"d{i}#0", document_id=f"d{i}", chunk_index=0, text=t, score=1 - i / 10)
            for i, t in enumerate(texts)]


async def _serve_fakes() -> int:
    import grpc

    from ragtune.v1 import common_pb2, generator_pb2, generator_pb2_grpc, retriever_pb2, retriever_pb2_grpc

    hits = _hits()

    class Retriever(retriever_pb2_grpc.RetrieverServiceServicer):
        async def Search(self, request, context):
            return retriever_pb2.SearchResponse(hits=hits[: request.top_k])

    class Generator(generator_pb2_grpc.GeneratorServiceServicer):
        async def GetModelInfo(self, request, context):
            return generator_pb2.GetModelInfoResponse(base_model="fake", max_context_tokens=2048)

        async def GenerateStream(self, request, context):
            for i in range(min(FAKE_TOKENS, request.sampling.max_tokens or FAKE_TOKENS)):
                yield generator_pb2.GenerateStreamResponse(delta=" Edith" if i == 0 else " Sorrel.")
            yield generator_pb2.GenerateStreamResponse(
                finish_reason=common_pb2.FINISH_REASON_STOP,
                usage=common_pb2.TokenUsage(prompt_tokens=100, completion_tokens=FAKE_TOKENS))

    server = grpc.aio.server()
    retriever_pb2_grpc.add_RetrieverServiceServicer_to_server(Retriever(), server)
    generator_pb2_grpc.add_GeneratorServiceServicer_to_server(Generator(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return port, server


async def _serve_gateway(variant: str, retriever: str, generator: str):
    import grpc

    import gateway.downstream
    import ragtune.server
    from gateway.server import GatewayService
    from gateway.settings import GatewaySettings
    from ragtune.v1 import gateway_pb2_grpc

    if variant != "telemetry":
        # Same code path, minus the OpenTelemetry interceptors on both sides (and no SDK providers).
        ragtune.server.server_interceptors = lambda: []
        gateway.downstream.client_interceptors = lambda: []
    # No HTTP front (bench.http_front_bench measures it): two gateways of this bench run at once, and both
    # would want its port.
    settings = GatewaySettings(port=0, http_port=-1, api_keys=os.environ["BENCH_API_KEYS"], retriever_address=retriever,
                               generator_address=generator, trainer_address=generator, evaluation_workers=0)
    if variant == "bare":
        service = GatewayService(settings)
        server = grpc.aio.server()
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(service.servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await service.start()
        return port, server
    host = ragtune.server.ServiceHost(GatewayService(settings), settings, name="gateway")
    port = await host.start()
    return port, host


def _main(argv: list[str]) -> None:
    if argv[0] == "gateway" and argv[1] == "telemetry":
        from ragtune.telemetry import configure_telemetry

        configure_telemetry("gateway")  # as run_service does: SDK tracer and meter providers

    async def run():
        port, _keep = await (_serve_fakes() if argv[0] == "fakes" else _serve_gateway(*argv[1:4]))
        print(f"PORT {port}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin

    asyncio.run(run())


class Child:
    """A child process from this module, with the port it serves on."""

    def __init__(self, *args: str, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.gateway_fakes", *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env={**os.environ, **(env or {})}, text=True)
        for line in self.proc.stdout:
            if line.startswith("PORT "):
                self.address = f"127.0.0.1:{int(line.split()[1])}"
                return
        raise RuntimeError(f"bench.gateway_fakes {' '.join(args)} exited with {self.proc.wait()}")

    def stop(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def api_keys() -> tuple[str, str]:
    """A key for tenant 'bench' and the keys JSON a gateway imports."""
    from ragtune.controlplane.api_keys import new_key_entry

    key, entry = new_key_entry("bench", ["admin"])
    return key, json.dumps({"keys": [entry]})


if __name__ == "__main__":
    _main(sys.argv[1:])
