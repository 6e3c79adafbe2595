"""Ask: retrieve, assemble the prompt, stream the generator's answer, map its citations, time it."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import AsyncIterator

from ragtune.errors import FieldViolation, InvalidArgument
from ragtune.v1 import common_pb2, gateway_pb2, generator_pb2, retriever_pb2
from gateway.downstream import CallBudget, Downstream
from gateway.prompting import (
    ContextPassage,
    build_messages,
    cited_numbers,
    fit_passages,
    inferred_citations,
    prompt_skeleton_tokens,
)

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


def validate_question(q: gateway_pb2.AskQuestion, max_top_k: int) -> None:
    problems = []
    if not q.question.strip():
        problems.append(FieldViolation("question.question", "must not be empty"))
    elif len(q.question) > MAX_QUESTION_CHARS:
        problems.append(FieldViolation("question.question", f"must be at most {MAX_QUESTION_CHARS} characters"))
    if not q.no_retrieval and not q.collection:
        problems.append(FieldViolation("question.collection", "is required unless no_retrieval is set"))
    if q.top_k < 0 or q.top_k > max_top_k:
        problems.append(FieldViolation("question.top_k", f"must be between 1 and {max_top_k} (0 for the default)"))
    if q.HasField("alpha") and not (0.0 <= q.alpha <= 1.0 and math.isfinite(q.alpha)):
        problems.append(FieldViolation("question.alpha", "must be in [0, 1]"))
    if problems:
        raise InvalidArgument.of(problems)


def _citation(p: ContextPassage, inferred: bool = False) -> gateway_pb2.Citation:
    return gateway_pb2.Citation(
        number=p.number, chunk_id=p.chunk_id, document_id=p.document_id, chunk_index=p.chunk_index,
        score=p.score, text=p.text, inferred=inferred,
    )


class AskPipeline:
    """One RAG request end to end; Ask aggregates the same stream AskStream sends."""

    def __init__(self, downstream: Downstream, count_tokens: TokenCounter, *, default_top_k: int,
                 max_top_k: int, default_max_tokens: int):
        self._down = downstream
        self._count = count_tokens
        self._default_top_k = default_top_k
        self._max_top_k = max_top_k
        self._default_max_tokens = default_max_tokens
        self._context_window: int | None = None
        self._skeleton_tokens = prompt_skeleton_tokens(count_tokens.messages, count_tokens.text)

    async def _window(self, budget: CallBudget) -> int:
        if self._context_window is None:
            info = await self._down.unary(
                "generator", self._down.generator.GetModelInfo, generator_pb2.GetModelInfoRequest(), budget,
                idempotent=True,
            )
            self._context_window = info.max_context_tokens
        return self._context_window

    async def _retrieve(self, q: gateway_pb2.AskQuestion, budget: CallBudget) -> list[ContextPassage]:
        request = retriever_pb2.SearchRequest(
            collection=q.collection, query=q.question, mode=q.mode, top_k=q.top_k or self._default_top_k,
        )
        if q.HasField("alpha"):
            request.alpha = q.alpha
        if q.HasField("filter"):
            request.filter.CopyFrom(q.filter)
        reply = await self._down.unary("retriever", self._down.retriever.Search, request, budget, idempotent=True)
        return [
            ContextPassage(i + 1, h.chunk_id, h.document_id, h.chunk_index, h.score, h.text)
            for i, h in enumerate(reply.hits)
        ]

    async def stream(self, q: gateway_pb2.AskQuestion, budget: CallBudget) -> AsyncIterator[gateway_pb2.AskStreamResponse]:
        validate_question(q, self._max_top_k)
        started = time.perf_counter()
        sampling = common_pb2.SamplingParams()
        sampling.CopyFrom(q.sampling)
        if not sampling.HasField("temperature"):
            sampling.temperature = 0.0  # answers are greedy unless the client asks otherwise
        if not sampling.HasField("max_tokens"):
            sampling.max_tokens = self._default_max_tokens

        passages: list[ContextPassage] = []
        retrieval_s = 0.0
        if not q.no_retrieval:
            t0 = time.perf_counter()
            found = await self._retrieve(q, budget)
            window = await self._window(budget)
            retrieval_s = time.perf_counter() - t0
            passages = fit_passages(
                q.question, found, self._count.texts, self._skeleton_tokens,
                window - sampling.max_tokens - _WINDOW_MARGIN,
            )
            yield gateway_pb2.AskStreamResponse(context=gateway_pb2.AskContext(context=[_citation(p) for p in passages]))

        messages = build_messages(q.question, passages)
        request = generator_pb2.GenerateStreamRequest(
            input=generator_pb2.GenerationInput(
                chat=generator_pb2.ChatMessages(messages=[common_pb2.ChatMessage(**m) for m in messages])
            ),
            sampling=sampling,
            adapter=q.adapter,
        )
        gen_started = time.perf_counter()
        first_token_at = None
        answer: list[str] = []
        final = None
        async for part in self._down.stream_out("generator", self._down.generator.GenerateStream, request, budget):
            if part.delta:
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                answer.append(part.delta)
                yield gateway_pb2.AskStreamResponse(delta=part.delta)
            if part.finish_reason:
                final = part
        generation_s = time.perf_counter() - gen_started

        text = "".join(answer)
        numbers = cited_numbers(text, len(passages))
        inferred = not numbers
        if inferred:
            numbers = inferred_citations(text, passages)
        by_number = {p.number: p for p in passages}
        total_s = time.perf_counter() - started
        done = gateway_pb2.AskDone(
            citations=[_citation(by_number[n], inferred) for n in numbers],
            finish_reason=final.finish_reason if final else common_pb2.FINISH_REASON_UNSPECIFIED,
            usage=final.usage if final else None,
            timing=gateway_pb2.Timing(
                retrieval_ms=retrieval_s * 1000,
                generation_ms=generation_s * 1000,
                time_to_first_token_ms=((first_token_at or time.perf_counter()) - started) * 1000,
                total_ms=total_s * 1000,
                gateway_overhead_ms=max(0.0, (total_s - retrieval_s - generation_s) * 1000),
            ),
        )
        yield gateway_pb2.AskStreamResponse(done=done)

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
        response.answer = "".join(parts)
        return response
