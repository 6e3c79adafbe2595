"""Time to first token of the generator by prompt size, for engine settings: what the prefill costs.

Starts `python -m services.generator` once per variant (answers_levers.EngineVariant) (environment overrides on top of the defaults) and
sends it, one request at a time, RAG prompts in the gateway's own form (gateway.prompting.build_messages)
with 0, 1 and 4 passages of random wiki100 sentences, greedy, 8 tokens. Every prompt is new (its passages
and question are drawn afresh), so prefix caching can only reuse the fixed instructions, as it would across
users. Reports per variant and passage count: first-token p50/p95, prompt tokens, decode ms per token.

Default variants: the shipped settings; vLLM's own defaults (one CPU reserved for its scheduler, 128-token
KV blocks); each of those two changes alone; `OMP_NUM_THREADS=2`.

Run: .venv/bin/python -m bench.first_token_bench [--prompts 7] [--variants 'name:VAR=value,...;...']
Writes bench/results/first_token.json.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import time
from pathlib import Path

from bench.common import summary, write_result

PASSAGES = (0, 1, 4)
DEFAULT_VARIANTS = (
    "shipped:;"
    "vllm-defaults:RAGTUNE_GENERATOR_RESERVED_CPUS=1,RAGTUNE_GENERATOR_BLOCK_SIZE=128;"
    "reserve-one-cpu:RAGTUNE_GENERATOR_RESERVED_CPUS=1;"
    "blocks-128:RAGTUNE_GENERATOR_BLOCK_SIZE=128;"
    "vllm-defaults-omp2:RAGTUNE_GENERATOR_RESERVED_CPUS=1,RAGTUNE_GENERATOR_BLOCK_SIZE=128,OMP_NUM_THREADS=2"
)


def _sentences() -> list[str]:
    from clients.samples import wiki100_articles

    out = []
    for _, text in wiki100_articles():
        out += [s for s in re.split(r"(?<=[.!?])\s+", text) if 60 < len(s) < 300]
    return out


def _request(rng: random.Random, sentences: list[str], passages: int, per_passage: int):
    from gateway.prompting import ContextPassage, build_messages
    from ragtune.v1 import common_pb2, generator_pb2

    context = [ContextPassage(i + 1, f"c{i}", f"Doc{rng.randrange(10**6)}", 0, 1.0,
                              " ".join(rng.sample(sentences, per_passage))) for i in range(passages)]
    question = f"What is the {rng.choice(['capital', 'river', 'founding year'])} of item {rng.randrange(10**6)}?"
    messages = [common_pb2.ChatMessage(**m) for m in build_messages(question, context)]
    return generator_pb2.GenerateStreamRequest(
        input=generator_pb2.GenerationInput(chat=generator_pb2.ChatMessages(messages=messages)),
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=8))


def measure(name: str, overrides: dict[str, str], prompts: int, per_passage: int, logs: Path) -> dict:
    import grpc

    from bench.answers_levers import EngineVariant
    from ragtune.v1 import generator_pb2_grpc

    engine = EngineVariant(name, overrides, logs)
    try:
        engine.wait()
        rng, sentences = random.Random(1), _sentences()
        out = {}
        with grpc.insecure_channel(engine.address) as channel:
            stub = generator_pb2_grpc.GeneratorServiceStub(channel)
            for passages in PASSAGES:
                ttft, decode, tokens = [], [], []
                for n in range(prompts + 1):  # the first is a warm-up
                    started, first, last = time.perf_counter(), None, None
                    for part in stub.GenerateStream(_request(rng, sentences, passages, per_passage), timeout=300,
                                                    metadata=(("x-ragtune-tenant", "bench"),)):
                        if part.delta and first is None:
                            first = time.perf_counter() - started
                        last = part
                    total = time.perf_counter() - started
                    if n and first is not None:
                        ttft.append(first * 1000)
                        tokens.append(last.usage.prompt_tokens)
                        decode.append((total - first) * 1000 / max(1, last.usage.completion_tokens - 1))
                out[str(passages)] = {"ttft_ms": summary(ttft), "prompt_tokens_mean": sum(tokens) / len(tokens),
                                      "decode_ms_per_token": summary(decode)}
        return out
    finally:
        engine.stop()


def main(argv: list[str] | None = None) -> int:
    from bench.answers_levers import parse_engine_variants

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=7, help="prompts per passage count and variant")
    parser.add_argument("--sentences", type=int, default=3, help="wiki sentences per passage")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="'name:VAR=value,...;name2:...'")
    args = parser.parse_args(argv)
    import tempfile

    os.environ.setdefault("RAGTUNE_HOME", tempfile.mkdtemp(prefix="ragtune-first-token-"))
    logs = Path(os.environ["RAGTUNE_HOME"])
    results = {}
    for name, overrides in parse_engine_variants(args.variants).items():
        results[name] = {"env": overrides, "by_passages": measure(name, overrides, args.prompts, args.sentences, logs)}
        row = results[name]["by_passages"]
        print(f"{name:<20} " + "  ".join(
            f"{p} passages ({row[p]['prompt_tokens_mean']:.0f} tokens): {row[p]['ttft_ms']['p50']:.0f} ms"
            for p in row) + f"  decode {row['4']['decode_ms_per_token']['p50']:.1f} ms/token", flush=True)
    write_result("first_token", {"settings": vars(args), "variants": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
