"""Answer benchmark: how often ragtune's answers are right, cited and quick, against the gold-passage
ceiling and a plain pipeline, on invented facts among real wiki100 distractors (bench/answers_data.py).

Starts the real four services (clients.launcher.isolated_suite), ingests the corpus through the
gateway, and asks every question through three arms, interleaved question by question:
- rag:   AskStream through the real gateway with its defaults (what a client gets);
- gold:  the generator handed the one gold passage in the gateway's own prompt (the ceiling);
- plain: fixed 150-word chunks, exact vector search with the same embedder, top 3, a plain prompt,
         then the same generator (bench/answers_plain.py).
Update questions are asked after their documents were re-ingested with a changed fact (same ids).
Every run also has `rag:four-passages`, the gateway's pipeline made to keep four passages whatever their
weight: the time to first token with four passages of context is a target of its own. It asks each
question before the other arms, so vLLM's prefix cache never hands it their work on the same question
(arms asked later may reuse its blocks: a lever's first-token delta is only as good as that caveat).
`--levers all` adds in-process gateway pipelines with one answer setting changed each (same retriever
and generator), so each lever's effect is measured in the same run; `--engine-variants` starts more
generators with environment overrides (threads, compiled mode) and sends them the gold prompts too;
`--skip-first 8` asks only the questions the answer settings were not tuned on.
Every run counts, per arm, the answers that repeat a run of the gateway's system prompt
(`system_prompt_leaks`, with the gateway's own detector, gateway.leak_guard): the goal is 0 for the arms
that go through the gateway; the gold arm, straight to the generator, shows how often the model itself leaks.

Run: .venv/bin/python -m bench.answers_bench [--per-kind 8] [--levers all]; writes bench/results/answers.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from bench.answers_data import KINDS, UNANSWERABLE, UPDATE, Corpus, Item, build_corpus
from bench.answers_score import FINISH_REASONS, Answer, StreamedAnswer, from_done, score, tally
from bench.common import write_result

COLLECTION = "answers"


class GatewayArm:
    """AskStream through the running gateway, timed by the client."""

    name = "rag"

    def __init__(self, client, request_options: dict, max_tokens: int):
        self._client, self._options, self._max_tokens = client, request_options, max_tokens

    def ask(self, item: Item) -> Answer:
        from ragtune.v1 import gateway_pb2

        q = gateway_pb2.AskQuestion(question=item.question, collection=COLLECTION, **self._options)
        if self._max_tokens:
            q.sampling.max_tokens = self._max_tokens
        answer = StreamedAnswer(time.perf_counter())
        for event in self._client.stream("AskStream", gateway_pb2.AskStreamRequest(question=q)):
            answer.take(event)
        elapsed = time.perf_counter() - answer.started
        return from_done(self.name, item, "".join(answer.parts), answer.context, answer.done, elapsed, answer.ttft)


class GeneratorArm:
    """Chat messages straight to the generator's GenerateStream (the gold and plain arms)."""

    def __init__(self, name: str, address: str, max_tokens: int, stop: tuple[str, ...]):
        import grpc

        from ragtune.tenancy import tenant_metadata
        from ragtune.v1 import generator_pb2_grpc

        self.name = name
        self._stub = generator_pb2_grpc.GeneratorServiceStub(grpc.insecure_channel(address))
        self._metadata = tenant_metadata("demo", os.environ.get("RAGTUNE_INTERNAL_TOKEN"))
        self._max_tokens, self._stop = max_tokens, stop

    def generate(self, item: Item, messages: list[dict[str, str]], t0: float) -> Answer:
        from ragtune.v1 import common_pb2, generator_pb2

        sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=self._max_tokens, stop=list(self._stop))
        request = generator_pb2.GenerateStreamRequest(
            input=generator_pb2.GenerationInput(chat=generator_pb2.ChatMessages(
                messages=[common_pb2.ChatMessage(**m) for m in messages])),
            sampling=sampling)
        parts, ttft, last = [], None, None
        for part in self._stub.GenerateStream(request, metadata=self._metadata, timeout=300):
            if part.delta:
                ttft = ttft or time.perf_counter() - t0
                parts.append(part.delta)
            last = part
        elapsed = time.perf_counter() - t0
        return Answer(self.name, item.id, item.kind, item.question, "".join(parts), elapsed * 1000,
                      (ttft or elapsed) * 1000, prompt_tokens=last.usage.prompt_tokens,
                      completion_tokens=last.usage.completion_tokens,
                      finish_reason=FINISH_REASONS.get(last.finish_reason, str(last.finish_reason)))


class GoldArm(GeneratorArm):
    def __init__(self, address: str, max_tokens: int, stop: tuple[str, ...]):
        super().__init__("gold", address, max_tokens, stop)

    def ask(self, item: Item) -> Answer:
        from gateway.prompting import ContextPassage, build_messages

        t0 = time.perf_counter()
        passage = ContextPassage(1, f"{item.gold_document}#0", item.gold_document, 0, 1.0, item.gold_passage)
        answer = self.generate(item, build_messages(item.question, [passage]), t0)
        answer.gold_in_context, answer.context_documents = True, [item.gold_document]
        return answer


class PlainArm(GeneratorArm):
    def __init__(self, address: str, max_tokens: int, index):
        super().__init__("plain", address, max_tokens, ())
        self.index = index

    def ask(self, item: Item) -> Answer:
        from bench.answers_plain import plain_messages

        t0 = time.perf_counter()
        hits = self.index.search(item.question)
        answer = self.generate(item, plain_messages(item.question, [text for _, text in hits]), t0)
        answer.context_documents = [doc for doc, _ in hits]
        answer.gold_in_context = item.gold_document in answer.context_documents
        answer.stale_in_context = any(s.lower() in text.lower() for _, text in hits for s in item.stale)
        return answer


def _select(corpus: Corpus, per_kind: int, skip: int = 0) -> list[Item]:
    chosen: list[Item] = []
    for kind in KINDS:
        chosen.extend([i for i in corpus.items if i.kind == kind][skip:skip + per_kind])
    return chosen


def _ask_all(arms: list, items: list[Item], results: list[Answer], log, first=None) -> None:
    """Each question through every arm, the arms' order rotated per question (interleaved: a noisy
    moment on the shared cores lands on all arms alike). The `first` arm asks each question before the
    others: vLLM's prefix cache would otherwise hand it the KV blocks of another arm's prompt for the
    same question (same instructions, same first passage), flattering its time to first token."""
    rotating = [a for a in arms if a is not first]
    for n, item in enumerate(items):
        shift = n % len(rotating)
        for arm in ([first] if first is not None else []) + rotating[shift:] + rotating[:shift]:
            answer = score(arm.ask(item), item.answers, item.stale, item.gold_document,
                           citations=arm.name.startswith("rag"))
            results.append(answer)
            log(f"  {arm.name:<12} {item.id:<15} {'ok ' if answer.correct else 'BAD'} "
                f"{answer.latency_ms:6.0f} ms  {answer.answer.strip()[:90]!r} -> {answer.cited_documents}")


def summarize(results: list[Answer], arms: list[str]) -> dict:
    table: dict[str, dict[str, dict]] = {}
    for arm in arms:
        mine = [a for a in results if a.arm == arm]
        table[arm] = {kind: tally([a for a in mine if a.kind == kind]) for kind in KINDS}
        table[arm]["answerable"] = tally([a for a in mine if a.kind != UNANSWERABLE])
        table[arm]["all"] = tally(mine)
    return table


def system_prompt_leaks(results: list[Answer], arms: list[str]) -> dict[str, int]:
    """Per arm, the answers that repeat a run of the gateway's system prompt."""
    from gateway.leak_guard import contains_system_prompt

    return {arm: sum(contains_system_prompt(a.answer) for a in results if a.arm == arm) for arm in arms}


def targets(table: dict) -> dict:
    """The issue's targets, checked on this run."""
    from bench.answers_levers import FOUR_PASSAGES

    rag, gold, plain = table["rag"], table["gold"], table["plain"]
    four = table[f"rag:{FOUR_PASSAGES}"]
    within = {k: rag[k]["correct"] >= gold[k]["correct"] - 1 for k in KINDS}
    return {
        "rag_within_one_of_gold_per_kind": within,
        "citations_gold_only_of_correct": rag["answerable"].get("cited_gold_only_of_correct", 0.0),
        "citations_target": 0.95,
        "rag_latency_p50_ms": rag["all"]["latency_ms"]["p50"],
        "plain_latency_p50_ms": plain["all"]["latency_ms"]["p50"],
        "rag_no_slower_than_plain": rag["all"]["latency_ms"]["p50"] <= plain["all"]["latency_ms"]["p50"],
        "rag_ttft_p50_ms": rag["all"]["ttft_ms"]["p50"],
        "rag_ttft_under_500_ms": rag["all"]["ttft_ms"]["p50"] < 500,
        # The same pipeline made to keep four passages whatever their weight: the prompt size the target names.
        "four_passages_mean": four["all"]["passages_mean"],
        "four_passages_prompt_tokens_mean": four["all"]["prompt_tokens_mean"],
        "four_passages_ttft_p50_ms": four["all"]["ttft_ms"]["p50"],
        "four_passages_ttft_under_500_ms": four["all"]["ttft_ms"]["p50"] < 500,
        "stale_answers": rag[UPDATE]["stale"],
    }


def lever_effect(table: dict, arm: str) -> dict:
    """A lever arm against the rag arm of the same run. Each lever arm undoes or changes one default, so a
    negative correct_delta means the default is better; positive latency deltas mean the change is slower."""
    rag, other = table["rag"], table[arm]
    return {
        "correct_delta": {k: other[k]["correct"] - rag[k]["correct"] for k in (*KINDS, "all")},
        "cited_gold_only_delta": (other["answerable"].get("cited_gold_only", 0)
                                  - rag["answerable"].get("cited_gold_only", 0)),
        "latency_p50_delta_ms": other["all"]["latency_ms"]["p50"] - rag["all"]["latency_ms"]["p50"],
        "ttft_p50_delta_ms": other["all"]["ttft_ms"]["p50"] - rag["all"]["ttft_ms"]["p50"],
        "prompt_tokens_delta": other["all"]["prompt_tokens_mean"] - rag["all"]["prompt_tokens_mean"],
    }


def engine_effect(table: dict, arm: str) -> dict:
    """The gold prompts on a generator variant against the suite's generator, same run, interleaved."""
    gold, other = table["gold"]["all"], table[arm]["all"]
    return {
        "correct_delta": other["correct"] - gold["correct"],
        "latency_p50_ms": {"default": gold["latency_ms"]["p50"], "variant": other["latency_ms"]["p50"]},
        "ttft_p50_ms": {"default": gold["ttft_ms"]["p50"], "variant": other["ttft_ms"]["p50"]},
        "decode_ms_per_token": {"default": _ms_per_token(gold), "variant": _ms_per_token(other)},
    }


def _ms_per_token(row: dict) -> float:
    tokens = max(1.0, row["completion_tokens_mean"] - 1)
    return (row["latency_ms"]["mean"] - row["ttft_ms"]["mean"]) / tokens


def render_levers(levers: list[dict]) -> str:
    lines = [f"{'lever (one change from the gateway defaults)':<58} {'right':>6} {'cited':>6} {'p50':>7} {'ttft':>7} "
             f"{'prompt':>7}  per kind (short needle rare update unans)"]
    for lv in levers:
        d = lv["correct_delta"]
        lines.append(f"{lv['arm'] + ': ' + lv['change']:<58.58} {d['all']:>+6} {lv['cited_gold_only_delta']:>+6} "
                     f"{lv['latency_p50_delta_ms']:>+7.0f} {lv['ttft_p50_delta_ms']:>+7.0f} "
                     f"{lv['prompt_tokens_delta']:>+7.0f}  "
                     + " ".join(f"{d[k]:+d}" for k in KINDS))
    return "\n".join(lines)


def render_table(table: dict) -> str:
    head = (f"{'kind':<13} {'arm':<12} {'right':>6} {'cited':>6} {'abst':>5} {'stale':>5} {'gold@ctx':>8} "
            f"{'ctx':>4} {'p50 ms':>7} {'p95 ms':>7} {'ttft50':>7} {'ttft95':>7} {'prompt':>6} {'compl':>5}")
    lines = [head, "-" * len(head)]
    for kind in (*KINDS, "answerable", "all"):
        for arm, rows in table.items():
            r = rows[kind]
            cited = f"{r['cited_gold_only']}" if "cited_gold_only" in r else "-"
            lines.append(
                f"{kind:<13} {arm:<12} {r['correct']:>3}/{r['n']:<2} {cited:>6} {r['abstained']:>5} {r['stale']:>5} "
                f"{r['gold_in_context']:>8} {r['passages_mean']:>4.1f} "
                f"{r['latency_ms']['p50']:>7.0f} {r['latency_ms']['p95']:>7.0f} "
                f"{r['ttft_ms']['p50']:>7.0f} {r['ttft_ms']['p95']:>7.0f} {r['prompt_tokens_mean']:>6.0f} "
                f"{r['completion_tokens_mean']:>5.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-kind", type=int, default=8, help="questions per kind (12 short, needle and "
                        "rare-name, 8 update and 10 unanswerable are written)")
    parser.add_argument("--skip-first", type=int, default=0, help="start each kind at this question: the answer "
                        "settings were tuned on the first 8 of each kind; --skip-first 8 asks only the others")
    parser.add_argument("--distractors", type=int, default=10, help="wiki100 articles ingested as distractors (max 18)")
    parser.add_argument("--max-tokens", type=int, default=64, help="answer length of the gold and plain arms")
    parser.add_argument("--rag-max-tokens", type=int, default=0, help="the rag arm's max_tokens; 0 leaves the "
                        "gateway's default")
    parser.add_argument("--top-k", type=int, default=0, help="the rag arm's top_k (0: the gateway's default)")
    parser.add_argument("--levers", default="", help="also run in-process pipelines with one answer setting changed "
                        "each: 'all' or a comma-separated list (bench/answers_levers.py names them)")
    parser.add_argument("--engine-variants", default="", help="engine levers: 'name:VAR=value,...;name2:...' starts "
                        "one more generator per variant with those environment variables and sends it the gold arm's "
                        "prompts too (arm gold@name), e.g. 'omp2:OMP_NUM_THREADS=2'")
    parser.add_argument("--output", default="answers", help="results file name under bench/results/")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    log = (lambda *_: None) if args.quiet else (lambda text: print(text, flush=True))

    from bench.answers_plain import PlainIndex
    from gateway import prompting
    from clients.cli.client import GatewayClient, dev_key_path
    from clients.cli.operations import ingest
    from clients.launcher import isolated_suite
    from clients.samples import wiki100_articles
    from ragtune.v1 import gateway_pb2, retriever_pb2

    corpus = build_corpus(dict(wiki100_articles()), args.distractors)
    items = _select(corpus, args.per_kind, args.skip_first)
    suite, gateway = isolated_suite("ragtune-answers-")
    started = time.perf_counter()
    engines = []
    try:
        suite.start()
        if args.engine_variants:
            from bench.answers_levers import EngineVariant, parse_engine_variants

            engines = [EngineVariant(name, env, suite.logs)
                       for name, env in parse_engine_variants(args.engine_variants).items()]
        suite.wait_serving()
        for engine in engines:
            engine.wait()
        client = GatewayClient(gateway, dev_key_path().read_text().strip())
        docs = [retriever_pb2.Document(id=k, text=v) for k, v in corpus.documents.items()]
        t0 = time.perf_counter()
        totals = ingest(client, COLLECTION, docs, quiet=True)
        log(f"ingested {totals['upserted']} documents, {totals['chunks']} chunks in {time.perf_counter() - t0:.0f} s")
        t0 = time.perf_counter()
        index = PlainIndex()
        plain_chunks = index.upsert(corpus.documents)
        log(f"plain index: {plain_chunks} chunks in {time.perf_counter() - t0:.0f} s")

        options = {"top_k": args.top_k} if args.top_k else {}
        generator = os.environ["RAGTUNE_GATEWAY_GENERATOR_ADDRESS"]
        # The ceiling gets the same prompt and stop conditions as the gateway, and the gateway's default
        # answer length when the rag arm uses it: only the retrieval differs.
        stop = tuple(getattr(prompting, "ANSWER_STOP", ()))
        gold_tokens = args.rag_max_tokens or _gateway_default_max_tokens() or args.max_tokens
        arms = [GatewayArm(client, options, args.rag_max_tokens), GoldArm(generator, gold_tokens, stop),
                PlainArm(generator, args.max_tokens, index)]
        for engine in engines:
            arm = GoldArm(engine.address, gold_tokens, stop)
            arm.name = f"gold@{engine.name}"
            arms.append(arm)
        from bench.answers_levers import FOUR_PASSAGES
        from bench.answers_levers import lever_arms as make_lever_arms
        from bench.answers_levers import names as lever_names

        chosen = lever_names() if args.levers == "all" else [n for n in args.levers.split(",") if n]
        lever_arms = make_lever_arms([FOUR_PASSAGES, *[n for n in chosen if n != FOUR_PASSAGES]], args.rag_max_tokens)
        arms += lever_arms
        warm = Item("warm-up", "warm-up", "What is engineering?", ("engineering",), "Engineering",
                    gold_passage=corpus.documents.get("Engineering", "Engineering is the practice of design.")[:600])
        for arm in arms:
            arm.ask(warm)

        results: list[Answer] = []
        four = next(a for a in lever_arms if a.name == f"rag:{FOUR_PASSAGES}")  # its first token is a target
        _ask_all(arms, [i for i in items if i.kind != UPDATE], results, log, first=four)
        t0 = time.perf_counter()
        reply = client.call("UpsertDocuments", gateway_pb2.GatewayServiceUpsertDocumentsRequest(
            request=retriever_pb2.UpsertDocumentsRequest(collection=COLLECTION, documents=[
                retriever_pb2.Document(id=k, text=v) for k, v in corpus.updated.items()]))).response
        index.upsert(corpus.updated)
        log(f"re-ingested {reply.upserted} changed documents in {time.perf_counter() - t0:.1f} s")
        _ask_all(arms, [i for i in items if i.kind == UPDATE], results, log, first=four)

        names = [a.name for a in arms]
        table = summarize(results, names)
        leaks = system_prompt_leaks(results, names)
        result = {
            "config": {**vars(args), "distractor_articles": args.distractors, "documents": len(corpus.documents),
                       "chunks": totals["chunks"], "plain_chunks": plain_chunks,
                       "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                       "gateway_env": {k: v for k, v in os.environ.items() if k.startswith("RAGTUNE_GATEWAY_")
                                       and "ADDRESS" not in k and "KEY" not in k}},
            "table": table,
            "targets": {**targets(table),
                        "no_system_prompt_leaks_through_gateway": not any(
                            n for arm, n in leaks.items() if arm.startswith("rag"))},
            "system_prompt_leaks": leaks,
            "levers": [{**a.describe(), **lever_effect(table, a.name)} for a in lever_arms],
            "engine_variants": {e.name: {"env": e.overrides, **engine_effect(table, f"gold@{e.name}")}
                                for e in engines},
            "wall_s": time.perf_counter() - started,
            "answers": [dataclasses.asdict(a) for a in results],
        }
        write_result(args.output, result)
        print(render_table(table))
        if result["levers"]:
            print(render_levers(result["levers"]))
        for name, e in result["engine_variants"].items():
            print(f"engine {name} {e['env']}: latency p50 {e['latency_p50_ms']['variant']:.0f} vs "
                  f"{e['latency_p50_ms']['default']:.0f} ms, TTFT p50 {e['ttft_p50_ms']['variant']:.0f} vs "
                  f"{e['ttft_p50_ms']['default']:.0f} ms, decode {e['decode_ms_per_token']['variant']:.1f} vs "
                  f"{e['decode_ms_per_token']['default']:.1f} ms/token, correct {e['correct_delta']:+d}")
        for key, value in result["targets"].items():
            print(f"  {key}: {value}")
        return 0
    finally:
        for engine in engines:
            engine.stop()
        suite.stop()


def _gateway_default_max_tokens() -> int:
    try:
        from gateway.settings import GatewaySettings

        return GatewaySettings().default_max_tokens
    except Exception:  # noqa: BLE001 - only a default for the gold arm
        return 0


if __name__ == "__main__":
    sys.exit(main())
