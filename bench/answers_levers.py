"""Lever arms for the answer benchmark: the gateway's own Ask pipeline, in this process, with one
answer setting changed from the gateway's defaults each, against the same retriever and generator.
Comparing each with the `rag` arm in the same run measures what that lever contributes."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time

from bench.answers_data import Item
from bench.answers_score import Answer, StreamedAnswer, from_done


FOUR_PASSAGES = "four-passages"  # always run: the time to first token with four passages is a target


def _variants():
    """name -> (description, change to AnswerOptions)."""
    from dataclasses import replace

    from ragtune.v1 import retriever_pb2

    def sel(**kw):
        return lambda o: replace(o, selection=replace(o.selection, **kw))

    return {
        "defaults": ("the gateway's defaults, in process (a check: should match the rag arm)", lambda o: o),
        "no-trim": ("whole chunks instead of their question-bearing sentences", sel(trim=False)),
        "no-rerank": ("passages in retrieval order, not by their kept sentences' weight", sel(rerank=False)),
        "no-dedupe": ("near-duplicate passages kept", sel(dedupe=False)),
        "keep-unrelated": ("passages sharing no term with the question kept", sel(drop_unrelated=False)),
        "keep-weak": ("passages far weaker than the best kept (min_share 0)", sel(min_share=0.0)),
        FOUR_PASSAGES: ("always four passages: none dropped as weak, unrelated or a near-duplicate (the prompt "
                        "size the latency target names)", sel(min_share=0.0, drop_unrelated=False, dedupe=False)),
        "best-last": ("strongest passage nearest the question (last) instead of first", sel(best_last=True)),
        "one-candidate": ("retrieve only top_k chunks (no extra candidates to rerank)",
                          lambda o: replace(o, candidate_factor=1)),
        "legacy-prompt": ("the earlier prompt (cite [n], any length) and no stop string",
                          lambda o: replace(o, legacy_prompt=True, stop=(), one_sentence=False)),
        "no-stop": ("no line-break stop string", lambda o: replace(o, stop=(), one_sentence=False)),
        "sentence-stop": ("the gateway also ends the answer after its first sentence",
                          lambda o: replace(o, one_sentence=True)),
        "overlap-citations": ("citations by plain word overlap (the earlier attribution)",
                              lambda o: replace(o, attribution="overlap")),
        "no-abstain": ("the model answers even when no passage mentions what the question names",
                       lambda o: replace(o, abstain=False)),
        "alpha-0.3": ("hybrid weight 0.3 (keyword-leaning)", lambda o: replace(o, alpha=0.3)),
        "alpha-0.8": ("hybrid weight 0.8 (vector-leaning)", lambda o: replace(o, alpha=0.8)),
        "vector": ("vector search only", lambda o: replace(o, mode=retriever_pb2.SEARCH_MODE_VECTOR)),
    }


def names() -> list[str]:
    """The levers `--levers all` runs (every one but the in-process copy of the defaults and the four-passage
    arm, which every run has)."""
    return [n for n in _variants() if n not in ("defaults", FOUR_PASSAGES)]


class _Loop:
    """One event loop in a thread for every in-process pipeline (grpc.aio channels live on one loop)."""

    _instance: "_Loop | None" = None

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name="lever-arms").start()

    @classmethod
    def get(cls) -> "_Loop":
        if cls._instance is None:
            cls._instance = _Loop()
        return cls._instance

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()


class LeverArm:
    """AskPipeline with changed options, timed like the gateway arm (minus the client -> gateway hop)."""

    def __init__(self, name: str, description: str, pipeline, options, max_tokens: int):
        self.name, self.description, self._pipeline, self.options = f"rag:{name}", description, pipeline, options
        self._max_tokens = max_tokens

    def describe(self) -> dict:
        return {"arm": self.name, "change": self.description}

    async def _ask(self, item: Item):
        from gateway.downstream import CallBudget
        from ragtune.v1 import gateway_pb2

        q = gateway_pb2.AskQuestion(question=item.question, collection="answers")
        if self._max_tokens:
            q.sampling.max_tokens = self._max_tokens
        answer = StreamedAnswer(time.perf_counter())
        async for event in self._pipeline.stream(q, CallBudget("demo", time.monotonic() + 300)):
            answer.take(event)
        elapsed = time.perf_counter() - answer.started
        return "".join(answer.parts), answer.context, answer.done, elapsed, answer.ttft

    def ask(self, item: Item) -> Answer:
        text, context, done, elapsed, ttft = _Loop.get().run(self._ask(item))
        return from_done(self.name, item, text, context, done, elapsed, ttft)


def lever_arms(selected: list[str], max_tokens: int) -> list[LeverArm]:
    """One arm per selected lever, each a fresh pipeline on the suite's retriever and generator."""
    from gateway.downstream import Downstream
    from gateway.rag import AnswerOptions, AskPipeline, TokenCounter
    from gateway.settings import GatewaySettings
    from ragtune.models import base_model_dir

    settings = GatewaySettings()
    counter = TokenCounter(base_model_dir(settings.model_cache))
    base = AnswerOptions.from_settings(settings)
    variants = _variants()
    unknown = [n for n in selected if n not in variants]
    if unknown:
        raise SystemExit(f"unknown lever(s) {unknown}; known: {', '.join(variants)}")

    async def build():
        down = Downstream(settings.retriever_address, settings.generator_address, settings.trainer_address,
                          internal_token=os.environ.get("RAGTUNE_INTERNAL_TOKEN"), retry_attempts=1,
                          retry_backoff_s=0.1)
        arms = []
        for name in selected:
            description, change = variants[name]
            options = change(base)
            pipeline = AskPipeline(down, counter, default_top_k=settings.default_top_k, max_top_k=settings.max_top_k,
                                   default_max_tokens=settings.default_max_tokens, options=options)
            arms.append(LeverArm(name, description, pipeline, dataclasses.asdict(options), max_tokens))
        return arms

    return _Loop.get().run(build())


class EngineVariant:
    """A second generator process with environment overrides (engine levers: threads, compiled mode),
    which the gold arm's prompts are also sent to, interleaved with the suite's own generator."""

    def __init__(self, name: str, overrides: dict[str, str], logs):
        import socket
        import subprocess
        import sys

        from clients.launcher import REPO_ROOT

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.name, self.overrides, self.address = name, overrides, f"127.0.0.1:{port}"
        env = {**os.environ, "RAGTUNE_GENERATOR_PORT": str(port), "PYTHONUNBUFFERED": "1", **overrides}
        log = open(logs / f"generator-{name}.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "services.generator"], cwd=REPO_ROOT, env=env,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float = 900) -> None:
        from grpc_health.v1 import health_pb2

        from clients.launcher import _status

        deadline = time.monotonic() + timeout
        while _status(self.address, "ragtune.v1.GeneratorService") != health_pb2.HealthCheckResponse.SERVING:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"generator variant {self.name} did not start (exit {self.proc.poll()})")
            time.sleep(0.5)

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except Exception:  # noqa: BLE001 - a stuck engine is killed
                self.proc.kill()


def parse_engine_variants(spec: str) -> dict[str, dict[str, str]]:
    """'omp2:OMP_NUM_THREADS=2;compiled:RAGTUNE_GENERATOR_ENFORCE_EAGER=false' -> {name: {VAR: value}}."""
    variants = {}
    for part in filter(None, spec.split(";")):
        name, _, assignments = part.partition(":")
        variants[name] = dict(a.split("=", 1) for a in assignments.split(",") if a)
    return variants
