"""Gateway benchmark: its own overhead per Ask, its time to first token against the generator's, and
where the gateway's time goes, each repeated over several rounds (median of the rounds' p50s, with
their spread) so that one noisy round on the shared cores cannot decide it.

Three parts:
- stages: the gateway's own steps in this process on the real tokenizer and realistic passages
  (validate, choose and trim passages, fit them to the window by bytes or with the tokenizer as
  before, build the prompt, attribute citations);
- hops: gateways in three configurations (bare; with ragtune's interceptors; as deployed, with
  OpenTelemetry tracing and metrics too) in front of instant stand-ins for the retriever and generator
  (bench/gateway_fakes.py), so the differences are the interceptors' and tracing's cost, and the bare
  gateway's time to first token minus the stand-in generator's is the stream plumbing (one more hop);
- suite: the real four services (clients.launcher.isolated_suite) with a wiki100 sample: Ask
  overhead (client latency minus the gateway's waits on retriever and generator, as Timing reports
  them) and the gateway's self-reported overhead; AskStream's time to first token (no retrieval)
  against GenerateStream on the generator with the same messages, interleaved.

Run: .venv/bin/python -m bench.gateway_bench [--rounds 5 --requests 40]; writes bench/results/gateway.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import grpc

from bench.common import summary, write_result


def _rounds(values: list[float]) -> dict[str, float]:
    """The median of per-round p50s, and their range."""
    return {"median_p50": statistics.median(values), "min_p50": min(values), "max_p50": max(values),
            "rounds": len(values)}


def _p50(values: list[float]) -> float:
    return summary(values)["p50"]


# --- stages ------------------------------------------------------------------------------------------------

def stage_breakdown(rounds: int, iterations: int) -> dict:
    from bench.gateway_fakes import QUESTION, _hits
    from gateway import evidence
    from gateway.prompting import ContextPassage, build_messages, fit_passages
    from gateway.rag import AskPipeline, TokenCounter, validate_question
    from gateway.selection import Selection, select_passages
    from ragtune.models import base_model_dir
    from ragtune.v1 import common_pb2, gateway_pb2, generator_pb2

    counter = TokenCounter(base_model_dir())
    pipeline = AskPipeline(None, counter, default_top_k=4, max_top_k=20, default_max_tokens=64)
    candidates = [ContextPassage(i + 1, h.chunk_id, h.document_id, 0, h.score, h.text) for i, h in enumerate(_hits())]
    q = gateway_pb2.AskQuestion(question=QUESTION, collection="c")
    answer = "The Brannock process was invented by Edith Sorrel in 1931."
    chosen = select_passages(QUESTION, candidates, Selection())
    budget = 2048 - 64 - 16

    def new_chunks():
        evidence.analysed.cache_clear()  # chunks this gateway has not seen before (words stay cached)
        select_passages(QUESTION, candidates, Selection())

    def prompt():
        messages = build_messages(QUESTION, chosen)
        generator_pb2.GenerateStreamRequest(input=generator_pb2.GenerationInput(chat=generator_pb2.ChatMessages(
            messages=[common_pb2.ChatMessage(**m) for m in messages])), sampling=common_pb2.SamplingParams())

    stages = {
        "validate": lambda: validate_question(q, 20),
        "select_passages (chunks seen before)": lambda: select_passages(QUESTION, candidates, Selection()),
        "select_passages (new chunks)": new_chunks,
        "fit by bytes (now)": lambda: pipeline._fit(QUESTION, chosen, budget),
        "fit with the tokenizer (before: 4 whole chunks)": lambda: fit_passages(
            QUESTION, candidates[:4], counter.texts, pipeline._skeleton_tokens, budget),
        "prompt and request": prompt,
        "attribution": lambda: pipeline._citations(answer, QUESTION, chosen),
    }
    per_round: dict[str, list[float]] = {name: [] for name in stages}
    for _ in range(rounds):
        for name, fn in stages.items():
            times = []
            for _ in range(iterations):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1000)
            per_round[name].append(_p50(times))
    return {name: _rounds(values) for name, values in per_round.items()}


# --- hops --------------------------------------------------------------------------------------------------

def _ask(client, gateway_pb2, question: str, **kw):
    q = gateway_pb2.AskQuestion(question=question, **kw)
    q.sampling.max_tokens = 16
    t0 = time.perf_counter()
    reply = client.call("Ask", gateway_pb2.AskRequest(question=q))
    return (time.perf_counter() - t0) * 1000, reply


def _ttft_gateway(client, gateway_pb2, question: str) -> float:
    """Time to the first answer token of AskStream, asking for one token so the stream ends there (a
    client that cancels mid-stream measures the same, but leaves the server a cancellation to handle)."""
    q = gateway_pb2.AskQuestion(question=question, no_retrieval=True)
    q.sampling.max_tokens = 1
    t0 = time.perf_counter()
    elapsed = None
    for event in client.stream("AskStream", gateway_pb2.AskStreamRequest(question=q)):
        if event.WhichOneof("event") == "delta" and elapsed is None:
            elapsed = (time.perf_counter() - t0) * 1000
    if elapsed is None:
        raise RuntimeError("no token")
    return elapsed


def _ttft_direct(stub, question: str, metadata) -> float:
    from ragtune.v1 import common_pb2, generator_pb2

    request = generator_pb2.GenerateStreamRequest(
        input=generator_pb2.GenerationInput(chat=generator_pb2.ChatMessages(
            messages=[common_pb2.ChatMessage(role="user", content=question)])),
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=1))
    t0 = time.perf_counter()
    elapsed = None
    for part in stub.GenerateStream(request, metadata=metadata, timeout=120):
        if part.delta and elapsed is None:
            elapsed = (time.perf_counter() - t0) * 1000
    if elapsed is None:
        raise RuntimeError("no token")
    return elapsed


def hop_breakdown(rounds: int, requests: int) -> dict:
    from bench.gateway_fakes import QUESTION, VARIANTS, Child, api_keys
    from clients.cli.client import GatewayClient
    from ragtune.tenancy import tenant_metadata
    from ragtune.v1 import gateway_pb2, generator_pb2_grpc

    key, keys_json = api_keys()
    children = []
    try:
        fakes = Child("fakes")
        children.append(fakes)
        gateways = {}
        for variant in VARIANTS:
            home = tempfile.mkdtemp(prefix=f"ragtune-gwbench-{variant}-")
            child = Child("gateway", variant, fakes.address, fakes.address,
                          env={"RAGTUNE_HOME": home, "BENCH_API_KEYS": keys_json, "RAGTUNE_LOG_LEVEL": "WARNING"})
            children.append(child)
            gateways[variant] = GatewayClient(child.address, key, timeout=30)
        direct = generator_pb2_grpc.GeneratorServiceStub(grpc.insecure_channel(fakes.address))
        metadata = tenant_metadata("bench")
        for client in gateways.values():  # warm: tokenizer caches, channels, first-call paths
            for _ in range(5):
                _ask(client, gateway_pb2, QUESTION, collection="c")
                _ttft_gateway(client, gateway_pb2, QUESTION)
        figures = {v: {"ask_ms": [], "overhead_ms": [], "self_reported_ms": [], "ttft_ms": []} for v in VARIANTS}
        figures["direct"] = {"ttft_ms": []}
        order = list(VARIANTS)
        for r in range(rounds):
            order = order[1:] + order[:1]  # rotate, so no configuration always runs first
            round_values = {v: {k: [] for k in figures[v]} for v in figures}
            for _ in range(requests):
                for variant in order:
                    client = gateways[variant]
                    elapsed, reply = _ask(client, gateway_pb2, QUESTION, collection="c")
                    t = reply.timing
                    round_values[variant]["ask_ms"].append(elapsed)
                    round_values[variant]["overhead_ms"].append(elapsed - t.retrieval_ms - t.generation_ms)
                    round_values[variant]["self_reported_ms"].append(t.gateway_overhead_ms)
                    round_values[variant]["ttft_ms"].append(_ttft_gateway(client, gateway_pb2, QUESTION))
                round_values["direct"]["ttft_ms"].append(_ttft_direct(direct, QUESTION, metadata))
            for v, values in round_values.items():
                for k, xs in values.items():
                    figures[v][k].append(_p50(xs))
        out = {v: {k: _rounds(xs) for k, xs in values.items()} for v, values in figures.items()}
        med = {v: {k: x["median_p50"] for k, x in values.items()} for v, values in out.items()}
        out["cost_ms"] = {
            "stream plumbing (bare gateway's TTFT - generator's)": med["bare"]["ttft_ms"] - med["direct"]["ttft_ms"],
            "ragtune interceptors, TTFT": med["no-telemetry"]["ttft_ms"] - med["bare"]["ttft_ms"],
            "ragtune interceptors, Ask": med["no-telemetry"]["ask_ms"] - med["bare"]["ask_ms"],
            "tracing and metrics, TTFT": med["telemetry"]["ttft_ms"] - med["no-telemetry"]["ttft_ms"],
            "tracing and metrics, Ask": med["telemetry"]["ask_ms"] - med["no-telemetry"]["ask_ms"],
        }
        return out
    finally:
        for child in reversed(children):
            child.stop()


# --- the real suite ----------------------------------------------------------------------------------------

def suite_run(rounds: int, requests: int, articles: int) -> dict:
    from clients.cli.client import GatewayClient, dev_key_path
    from clients.cli.operations import ingest
    from clients.launcher import isolated_suite
    from clients.samples import wiki100_articles
    from ragtune.tenancy import tenant_metadata
    from ragtune.v1 import gateway_pb2, generator_pb2_grpc, retriever_pb2

    suite, gateway = isolated_suite("ragtune-bench-")
    try:
        suite.start()
        suite.wait_serving()
        client = GatewayClient(gateway, dev_key_path().read_text().strip())
        docs = [retriever_pb2.Document(id=t, text=x) for t, x in wiki100_articles(articles)]
        ingest(client, "bench", docs, quiet=True)
        questions = ["Where does the name Africa come from?", "What is agriculture?", "What does anatomy study?",
                     "When did ancient history begin?"]
        generator = generator_pb2_grpc.GeneratorServiceStub(
            grpc.insecure_channel(os.environ["RAGTUNE_GATEWAY_GENERATOR_ADDRESS"]))
        metadata = tenant_metadata("demo", os.environ["RAGTUNE_INTERNAL_TOKEN"])  # isolated_suite's token
        for question in questions:  # warm-up, not measured
            _ask(client, gateway_pb2, question, collection="bench")
        names = ("ask_ms", "overhead_ms", "self_reported_ms", "ttft_gateway_ms", "ttft_direct_ms")
        figures: dict[str, list[float]] = {k: [] for k in names}
        raw: dict[str, list[float]] = {k: [] for k in names}
        for _ in range(rounds):
            values: dict[str, list[float]] = {k: [] for k in names}
            for i in range(requests):
                question = questions[i % len(questions)]
                elapsed, reply = _ask(client, gateway_pb2, question, collection="bench")
                values["ask_ms"].append(elapsed)
                values["overhead_ms"].append(elapsed - reply.timing.retrieval_ms - reply.timing.generation_ms)
                values["self_reported_ms"].append(reply.timing.gateway_overhead_ms)
                first, second = (_ttft_gateway, _ttft_direct) if i % 2 else (_ttft_direct, _ttft_gateway)
                for fn in (first, second):  # alternate which goes first
                    if fn is _ttft_gateway:
                        values["ttft_gateway_ms"].append(fn(client, gateway_pb2, question))
                    else:
                        values["ttft_direct_ms"].append(fn(generator, question, metadata))
            for k in names:
                figures[k].append(_p50(values[k]))
                raw[k].extend(values[k])
        out = {k: _rounds(v) for k, v in figures.items()}
        out["all_requests"] = {k: summary(v) for k, v in raw.items()}
        out["ttft_added_ms"] = out["ttft_gateway_ms"]["median_p50"] - out["ttft_direct_ms"]["median_p50"]
        return out
    finally:
        suite.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=40, help="requests per round and configuration")
    parser.add_argument("--iterations", type=int, default=200, help="repetitions per stage and round")
    parser.add_argument("--articles", type=int, default=4)
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: stages, hops, suite")
    args = parser.parse_args(argv)
    skip = set(args.skip.split(","))

    result: dict = {"rounds": args.rounds, "requests": args.requests,
                    "targets": {"overhead_p50_ms_max": 1.0, "ttft_added_ms_max": 5.0}}
    if "stages" not in skip:
        result["stages_ms"] = stage_breakdown(args.rounds, args.iterations)
        print("gateway stages (median of round p50s, ms):")
        for name, x in result["stages_ms"].items():
            print(f"  {name:<50} {x['median_p50']:7.3f}  ({x['min_p50']:.3f}-{x['max_p50']:.3f})")
    if "hops" not in skip:
        result["hops_ms"] = hop_breakdown(args.rounds, args.requests)
        print("gateway in front of instant stand-ins (median of round p50s, ms):")
        for variant in ("direct", "bare", "no-telemetry", "telemetry"):
            row = result["hops_ms"][variant]
            print(f"  {variant:<13} " + "  ".join(f"{k} {x['median_p50']:.2f}" for k, x in row.items()))
        for name, value in result["hops_ms"]["cost_ms"].items():
            print(f"  {name:<52} {value:+.2f} ms")
    if "suite" not in skip:
        result["suite_ms"] = suite_run(args.rounds, args.requests, args.articles)
        s = result["suite_ms"]
        print(f"real suite: overhead p50 {s['overhead_ms']['median_p50']:.2f} ms (self-reported "
              f"{s['self_reported_ms']['median_p50']:.2f} ms); TTFT gateway {s['ttft_gateway_ms']['median_p50']:.1f} "
              f"ms vs direct {s['ttft_direct_ms']['median_p50']:.1f} ms (+{s['ttft_added_ms']:.1f} ms)")
    write_result("gateway", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
