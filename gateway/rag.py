"""Ask: retrieve, assemble the prompt, stream the generator's answer, map its citations, time it."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import AsyncIterator

from ragtune.errors import FieldViolation, InvalidArgument
from ragtune.v1 import common_pb2, gateway_pb2, generator_pb2, retriever_pb2
from gateway.attribution import attribute
from gateway.downstream import CallBudget, Downstream
from gateway.evidence import first_sentence_end
from gateway.leak_guard import LeakGuard
from gateway.prompting import (
    ABSTENTION,
    ANSWER_STOP,
    ContextPassage,
    build_messages,
    cited_numbers,
    fit_passages,
    inferred_citations,
    prompt_skeleton_tokens,
    render_passage,
)
from gateway.selection import Selection, about_the_question, select_passages

MAX_QUESTION_CHARS = 8000
# Tokens kept free besides the answer: the chat template's own tokens vary slightly by message.
_WINDOW_MARGIN = 16


class TokenCounter:
    """Counts the prompt tokens of chat messages with the base model's tokenizer and chat template."""

    def __init__(self, tokenizer_dir: Path):
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))

    def messages(self, messages: list[dict[str, str]]) -> int:
        text = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.text(text)

    def text(self, text: str) -> int:
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def texts(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self._tokenizer(texts, add_special_tokens=False)["input_ids"]]


# The request fields the question rules name (Chat maps them onto its own, gateway.chat).
ASK_FIELDS = {"question": "question.question", "collection": "question.collection", "top_k": "question.top_k",
              "alpha": "question.alpha", "collection_rule": "is required unless no_retrieval is set"}


def question_violations(q: gateway_pb2.AskQuestion, max_top_k: int,
                        fields: dict[str, str] = ASK_FIELDS) -> list[FieldViolation]:
    problems = []
    if not q.question.strip():
        problems.append(FieldViolation(fields["question"], "must not be empty"))
    elif len(q.question) > MAX_QUESTION_CHARS:
        problems.append(FieldViolation(fields["question"], f"must be at most {MAX_QUESTION_CHARS} characters"))
    if not q.no_retrieval and not q.collection:
        problems.append(FieldViolation(fields["collection"], fields["collection_rule"]))
    if q.top_k < 0 or q.top_k > max_top_k:
        problems.append(FieldViolation(fields["top_k"], f"must be between 1 and {max_top_k} (0 for the default)"))
    if q.HasField("alpha") and not (0.0 <= q.alpha <= 1.0 and math.isfinite(q.alpha)):
        problems.append(FieldViolation(fields["alpha"], "must be in [0, 1]"))
    return problems


def validate_question(q: gateway_pb2.AskQuestion, max_top_k: int) -> None:
    problems = question_violations(q, max_top_k)
    if problems:
        raise InvalidArgument.of(problems)


def _citation(p: ContextPassage, inferred: bool = False) -> gateway_pb2.Citation:
    return gateway_pb2.Citation(
        number=p.number, chunk_id=p.chunk_id, document_id=p.document_id, chunk_index=p.chunk_index,
        score=p.score, text=p.text, inferred=inferred,
    )


@dataclass(frozen=True)
class AnswerOptions:
    """How Ask turns retrieved chunks into an answer (the gateway's answer settings; each field is a
    lever bench/answers_bench.py measures)."""

    selection: Selection = field(default_factory=Selection)
    candidate_factor: int = 2  # chunks asked of the retriever per passage kept: room to rerank and dedupe
    mode: int = retriever_pb2.SEARCH_MODE_UNSPECIFIED  # when the request sets none (retriever default: hybrid)
    alpha: float | None = None  # hybrid weight when the request sets none (None: the retriever's default)
    abstain: bool = True  # answer ABSTENTION, not the model's answer, when nothing retrieved is about the question
    # (base model only: an adapter may have been fine-tuned on the answer)
    attribution: str = "sentence"  # "sentence" (gateway.attribution) or "overlap" (the earlier word overlap)
    legacy_prompt: bool = False
    stop: tuple[str, ...] = ANSWER_STOP  # stop strings for answers from context, unless the request sets some
    one_sentence: bool = False  # end an answer from context after its first sentence (the gateway stops it)

    @classmethod
    def from_settings(cls, s) -> "AnswerOptions":
        return cls(
            selection=Selection(
                top_k=s.default_top_k, trim=s.answer_max_sentences > 0, max_sentences=max(1, s.answer_max_sentences),
                max_words=s.answer_max_words, rerank=s.answer_rerank, dedupe=s.answer_dedupe,
                drop_unrelated=s.answer_drop_unrelated, min_share=s.answer_min_share,
            ),
            candidate_factor=s.answer_candidate_factor, mode=retriever_pb2.SearchMode.Value(s.answer_mode),
            alpha=s.answer_alpha, abstain=s.answer_abstain, attribution=s.answer_attribution,
            stop=tuple(s.answer_stop), one_sentence=s.answer_one_sentence,
        )


async def after_first_event(parts: AsyncIterator, first_event) -> AsyncIterator:
    """The generator's stream, with `first_event` (the context event, or None) yielded first: the call has
    started already, so sending the context overlaps the generator's prefill. Closing this closes the call,
    which cancels the generator's work at once."""
    async with contextlib.aclosing(parts):
        pending = asyncio.ensure_future(anext(parts, None))
        try:
            if first_event is not None:
                yield first_event
            part = await pending
        finally:
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await pending
        while part is not None:
            yield part
            part = await anext(parts, None)


class AskPipeline:
    """One RAG request end to end; Ask aggregates the same stream AskStream sends."""

    def __init__(self, downstream: Downstream, count_tokens: TokenCounter, *, default_top_k: int,
                 max_top_k: int, default_max_tokens: int, options: AnswerOptions | None = None):
        self._down = downstream
        self._count = count_tokens
        self._default_top_k = default_top_k
        self._max_top_k = max_top_k
        self._default_max_tokens = default_max_tokens
        self._options = options or AnswerOptions()
        self._context_window: int | None = None
        self._skeleton_tokens = prompt_skeleton_tokens(count_tokens.messages, count_tokens.text)

    async def _window(self, budget: CallBudget) -> int:
        if self._context_window is None:
            info = await self._down.generator.get_model_info(generator_pb2.GetModelInfoRequest(), budget)
            self._context_window = info.max_context_tokens
        return self._context_window

    async def _retrieve(self, q: gateway_pb2.AskQuestion, top_k: int, budget: CallBudget) -> list[ContextPassage]:
        o = self._options
        request = retriever_pb2.SearchRequest(
            collection=q.collection, query=q.question, mode=q.mode or o.mode,
            top_k=min(self._max_top_k, top_k * max(1, o.candidate_factor)),
        )
        if q.HasField("alpha"):
            request.alpha = q.alpha
        elif o.alpha is not None:
            request.alpha = o.alpha
        if q.HasField("filter"):
            request.filter.CopyFrom(q.filter)
        reply = await self._down.retriever.search(request, budget)
        return [
            ContextPassage(i + 1, h.chunk_id, h.document_id, h.chunk_index, h.score, h.text)
            for i, h in enumerate(reply.hits)
        ]

    def _fit(self, question: str, passages: list[ContextPassage], budget_tokens: int) -> list[ContextPassage]:
        """The passages that fit the window. A byte-level BPE token covers at least one byte, so when the
        bytes fit, the tokens do: the tokenizer is only needed for prompts near the window."""
        rendered = sum(len(render_passage(p).encode()) + 2 for p in passages)
        if self._skeleton_tokens + len(question.encode()) + 2 + rendered <= budget_tokens:
            return passages
        return fit_passages(question, passages, self._count.texts, self._skeleton_tokens, budget_tokens)

    def _sampling(self, q: gateway_pb2.AskQuestion) -> common_pb2.SamplingParams:
        sampling = common_pb2.SamplingParams()
        sampling.CopyFrom(q.sampling)
        if not sampling.HasField("temperature"):
            sampling.temperature = 0.0  # answers are greedy unless the client asks otherwise
        if not sampling.HasField("max_tokens"):
            sampling.max_tokens = self._default_max_tokens
        if self._short_answer(q, sampling) and not sampling.stop:
            sampling.stop.extend(self._options.stop)
        return sampling

    def _short_answer(self, q: gateway_pb2.AskQuestion, sampling: common_pb2.SamplingParams) -> bool:
        """Answers from context are one sentence (stop strings, the first-sentence cut) unless the request
        asks for more tokens than the default answer length: then it wants a longer text."""
        return not q.no_retrieval and sampling.max_tokens <= self._default_max_tokens

    async def _check(self, q: gateway_pb2.AskQuestion, sampling: common_pb2.SamplingParams,
                     budget: CallBudget) -> None:
        """Has the generator check a request the gateway answers itself (one token of the bare question),
        so bad sampling parameters or adapters are refused the same way whether or not it abstains."""
        probe = common_pb2.SamplingParams()
        probe.CopyFrom(sampling)
        probe.max_tokens = 1
        await self._down.generator.generate(generator_pb2.GenerateRequest(
            input=generator_pb2.GenerationInput(chat=generator_pb2.ChatMessages(
                messages=[common_pb2.ChatMessage(role="user", content=q.question)])),
            sampling=probe, adapter=q.adapter), budget)

    def _citations(self, answer: str, question: str, passages: list[ContextPassage]) -> list[gateway_pb2.Citation]:
        marked = cited_numbers(answer, len(passages))
        if self._options.attribution == "sentence":
            found = attribute(answer, question, passages, marked)
            numbers, inferred = found.numbers, found.inferred
        else:
            inferred = not marked
            numbers = inferred_citations(answer, passages) if inferred else marked
        by_number = {p.number: p for p in passages}
        return [_citation(by_number[n], inferred) for n in numbers]

    async def stream(self, q: gateway_pb2.AskQuestion,
                     budget: CallBudget) -> AsyncIterator[gateway_pb2.AskStreamResponse]:
        validate_question(q, self._max_top_k)
        started = time.perf_counter()
        sampling = self._sampling(q)

        passages: list[ContextPassage] = []
        retrieval_s = 0.0
        context_event = None
        if not q.no_retrieval:
            t0 = time.perf_counter()
            top_k = q.top_k or self._default_top_k
            found = await self._retrieve(q, top_k, budget)
            window = await self._window(budget)
            retrieval_s = time.perf_counter() - t0
            o = self._options
            # An adapter may know the answer itself (fine-tuned on it), and must still be checked by the
            # generator: abstaining without generating is for the base model.
            abstain = o.abstain and not q.adapter
            if not (abstain and not about_the_question(q.question, found)):
                chosen = select_passages(q.question, found, replace(o.selection, top_k=top_k))
                passages = self._fit(q.question, chosen, window - sampling.max_tokens - _WINDOW_MARGIN)
            context_event = gateway_pb2.AskStreamResponse(
                context=gateway_pb2.AskContext(context=[_citation(p) for p in passages]))
            if not passages and abstain:
                # Nothing retrieved is about the question: say so rather than let the model invent an answer.
                t0 = time.perf_counter()
                await self._check(q, sampling, budget)
                yield context_event
                yield gateway_pb2.AskStreamResponse(delta=ABSTENTION)
                done = _done([], None, started, retrieval_s, time.perf_counter() - t0, time.perf_counter())
                yield gateway_pb2.AskStreamResponse(done=done)
                return

        messages = build_messages(q.question, passages, legacy=self._options.legacy_prompt)
        request = generator_pb2.GenerateStreamRequest(
            input=generator_pb2.GenerationInput(
                chat=generator_pb2.ChatMessages(messages=[common_pb2.ChatMessage(**m) for m in messages])
            ),
            sampling=sampling,
            adapter=q.adapter,
        )
        one_sentence = self._options.one_sentence and bool(passages) and self._short_answer(q, sampling)
        gen = _Generation(one_sentence=one_sentence)
        guard = LeakGuard()  # the answer never repeats the system prompt
        async for event in self._generate(request, context_event, gen, budget):
            if event.WhichOneof("event") == "delta":
                text = guard.feed(event.delta)[0]
                if not text:
                    continue
                event = gateway_pb2.AskStreamResponse(delta=text)
            yield event
        if tail := guard.flush()[0]:
            yield gateway_pb2.AskStreamResponse(delta=tail)
        generation_s = time.perf_counter() - gen.started
        citations = self._citations(guard.text, q.question, passages) if passages else []
        yield gateway_pb2.AskStreamResponse(done=_done(
            citations, gen.final, started, retrieval_s, generation_s, gen.first_token_at or time.perf_counter()))

    async def _generate(self, request: generator_pb2.GenerateStreamRequest, first_event, gen: "_Generation",
                        budget: CallBudget) -> AsyncIterator[gateway_pb2.AskStreamResponse]:
        """Streams the generator's answer as delta events, after `first_event` (the context) if any."""
        gen.started = time.perf_counter()
        stream = after_first_event(self._down.generator.generate_stream(request, budget), first_event)
        async with contextlib.aclosing(stream):  # leaving early cancels the generator's work at once
            async for part in stream:
                if part is first_event:
                    yield part
                    continue
                delta, ended = part.delta, False
                if delta and gen.one_sentence:
                    end = first_sentence_end(gen.text + delta, len(gen.text))
                    if end is not None:
                        # One sentence was asked for; small models keep going. Stop here, not at max_tokens.
                        delta, ended = (gen.text + delta)[len(gen.text):end], True
                gen.deltas += 1
                if delta:
                    if gen.first_token_at is None:
                        gen.first_token_at = time.perf_counter()
                    gen.text += delta
                    yield gateway_pb2.AskStreamResponse(delta=delta)
                if ended:
                    gen.final = generator_pb2.GenerateStreamResponse(
                        finish_reason=common_pb2.FINISH_REASON_STOP, usage=part.usage, adapter=part.adapter)
                    if not part.HasField("usage"):
                        # The generator reports usage (and the adapter version) with its last message only,
                        # which a cut never reads: count the tokens here; the version stays unknown.
                        gen.final.usage.prompt_tokens = self._count.messages(
                            [{"role": m.role, "content": m.content} for m in request.input.chat.messages])
                        gen.final.usage.completion_tokens = gen.deltas
                    return
                if part.finish_reason:
                    gen.final = part

    async def ask(self, q: gateway_pb2.AskQuestion, budget: CallBudget) -> gateway_pb2.AskResponse:
        response = gateway_pb2.AskResponse()
        parts = []
        async for event in self.stream(q, budget):
            kind = event.WhichOneof("event")
            if kind == "context":
                response.context.extend(event.context.context)
            elif kind == "delta":
                parts.append(event.delta)
            elif kind == "done":
                response.citations.extend(event.done.citations)
                response.finish_reason = event.done.finish_reason
                response.usage.CopyFrom(event.done.usage)
                response.timing.CopyFrom(event.done.timing)
                response.adapter = event.done.adapter
        response.answer = "".join(parts)
        return response

    # The steps Chat (gateway.chat) reuses for its retrieval path, under public names.
    window = _window
    retrieve = _retrieve
    fit = _fit
    answer_sampling = _sampling
    check = _check
    citations = _citations

    @property
    def options(self) -> AnswerOptions:
        return self._options

    @property
    def default_top_k(self) -> int:
        return self._default_top_k

    @property
    def max_top_k(self) -> int:
        return self._max_top_k


@dataclass
class _Generation:
    """What one generation produced, filled in as it streams."""

    one_sentence: bool
    started: float = 0.0
    first_token_at: float | None = None
    text: str = ""
    deltas: int = 0  # messages read (a token each, as the engine streams them)
    final: generator_pb2.GenerateStreamResponse | None = None


def _done(citations: list[gateway_pb2.Citation], final, started: float, retrieval_s: float, generation_s: float,
          first_token_at: float) -> gateway_pb2.AskDone:
    total_s = time.perf_counter() - started
    return gateway_pb2.AskDone(
        citations=citations,
        finish_reason=final.finish_reason if final else common_pb2.FINISH_REASON_STOP,
        usage=final.usage if final else None,
        adapter=final.adapter if final else "",
        timing=gateway_pb2.Timing(
            retrieval_ms=retrieval_s * 1000,
            generation_ms=generation_s * 1000,
            time_to_first_token_ms=(first_token_at - started) * 1000,
            total_ms=total_s * 1000,
            gateway_overhead_ms=max(0.0, (total_s - retrieval_s - generation_s) * 1000),
        ),
    )
