"""Gateway benchmark: its own overhead per Ask, and time to first token through it against the generator.

Starts the real four services as processes (ragtune.launcher.LocalSuite) on free ports with a
temporary RAGTUNE_HOME, ingests a wiki100 sample, then measures:
- overhead: Ask latency seen by the client minus the time the gateway spent waiting on the
  retriever and the generator (as it reports in Timing), p50/p95;
- time to first token of AskStream in no-retrieval mode against GenerateStream called directly on
  the generator with the same chat messages and sampling, interleaved, p50/p95.

Run: .venv/bin/python -m bench.gateway_bench [--requests 40]; writes bench/results/gateway.json.
"""

from __future__ import annotations

import argparse
import os
import time

import grpc

from bench.common import summary, write_result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--articles", type=int, default=4)
    args = parser.parse_args(argv)

    from ragtune.cli.client import GatewayClient, dev_key_path
    from ragtune.cli.main import ingest
    from ragtune.launcher import isolated_suite
    from ragtune.samples import wiki100_articles
    from ragtune.tenancy import tenant_metadata
    from ragtune.v1 import common_pb2, gateway_pb2, generator_pb2, generator_pb2_grpc, retriever_pb2

    suite, gateway = isolated_suite("ragtune-bench-")
    try:
        suite.start()
        suite.wait_serving()
        client = GatewayClient(gateway, dev_key_path().read_text().strip())
        docs = [retriever_pb2.Document(id=t, text=x) for t, x in wiki100_articles(args.articles)]
        ingest(client, "bench", docs, quiet=True)
        questions = ["Where does the name Africa come from?", "What is agriculture?", "What does anatomy study?",
                     "When did ancient history begin?"]

        sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
        overhead, self_reported, latency = [], [], []
        for i in range(args.requests):
            q = gateway_pb2.AskQuestion(question=questions[i % len(questions)], collection="bench", sampling=sampling)
            t0 = time.perf_counter()
            reply = client.call("Ask", gateway_pb2.AskRequest(question=q))
            elapsed_ms = (time.perf_counter() - t0) * 1000
            latency.append(elapsed_ms)
            overhead.append(elapsed_ms - reply.timing.retrieval_ms - reply.timing.generation_ms)
            self_reported.append(reply.timing.gateway_overhead_ms)

        generator = generator_pb2_grpc.GeneratorServiceStub(
            grpc.insecure_channel(os.environ["RAGTUNE_GATEWAY_GENERATOR_ADDRESS"]))
        ttft_gateway, ttft_direct = [], []
        for i in range(args.requests):
            question = questions[i % len(questions)]
            q = gateway_pb2.AskQuestion(question=question, no_retrieval=True, sampling=sampling)
            t0 = time.perf_counter()
            for event in client.stream("AskStream", gateway_pb2.AskStreamRequest(question=q)):
                if event.WhichOneof("event") == "delta":
                    ttft_gateway.append((time.perf_counter() - t0) * 1000)
                    break
            request = generator_pb2.GenerateStreamRequest(
                input=generator_pb2.GenerationInput(chat=generator_pb2.ChatMessages(
                    messages=[common_pb2.ChatMessage(role="user", content=question)])),
                sampling=sampling)
            t0 = time.perf_counter()
            for part in generator.GenerateStream(request, metadata=tenant_metadata("demo"), timeout=120):
                if part.delta:
                    ttft_direct.append((time.perf_counter() - t0) * 1000)
                    break

        gw, direct = summary(ttft_gateway), summary(ttft_direct)
        result = {
            "requests": args.requests,
            "max_tokens": args.max_tokens,
            "ask_latency_ms": summary(latency),
            "gateway_overhead_ms": summary(overhead),
            "gateway_overhead_self_reported_ms": summary(self_reported),
            "ttft_through_gateway_ms": gw,
            "ttft_generator_direct_ms": direct,
            "ttft_added_by_gateway_p50_ms": gw["p50"] - direct["p50"],
            "targets": {"overhead_p50_ms_max": 1.0, "ttft_added_ms_max": 5.0},
        }
        write_result("gateway", result)
        print(f"overhead p50 {result['gateway_overhead_ms']['p50']:.2f} ms, p95 {result['gateway_overhead_ms']['p95']:.2f} ms; "
              f"TTFT gateway p50 {gw['p50']:.1f} ms vs direct {direct['p50']:.1f} ms")
        return 0
    finally:
        suite.stop()


if __name__ == "__main__":
    raise SystemExit(main())
