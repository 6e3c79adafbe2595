"""Chat: a conversation answered by the base model or an adapter, plainly or with retrieval (multi-turn
RAG: a standalone search query, retrieval, an answer from the passages that cites them).

The retrieval path reuses Ask's steps (gateway.rag.AskPipeline: retrieval, passage selection, window
fitting, abstention, attribution); what Chat adds is the search query of a later turn
(gateway.chat_rewrite), the earlier turns in the answer prompt, and n choices with logprobs.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field, replace
from typing import AsyncIterator

from ragtune.errors import FieldViolation, InvalidArgument
from ragtune.v1 import common_pb2, gateway_pb2, generator_pb2
from gateway.chat_rewrite import (
    AS_WRITTEN, REWRITE_MAX_TOKENS, REWRITE_STOP, SearchQuery, judge_rewrite, rewrite_prompt,
)
from gateway.downstream import CallBudget, Downstream
from gateway.leak_guard import LeakGuard
from gateway.prompting import ABSTENTION, ContextPassage, build_messages
from gateway.rag import AskPipeline, TokenCounter, after_first_event, question_violations
from gateway.selection import about_the_question, select_passages

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
MAX_MESSAGES = 1000
_FIELDS = {
    "collection": "conversation.retrieval.collection", "top_k": "conversation.retrieval.top_k",
    "alpha": "conversation.retrieval.alpha", "collection_rule": "is required",
}
# Tokens kept free besides the answer (as Ask keeps): the template's own tokens vary slightly by message.
_WINDOW_MARGIN = 16


def validate_conversation(c: gateway_pb2.ChatConversation, max_top_k: int) -> None:
    problems: list[FieldViolation] = []
    messages = c.messages
    if not messages:
        raise InvalidArgument("conversation.messages", "at least one message is required")
    if len(messages) > MAX_MESSAGES:
        problems.append(FieldViolation("conversation.messages", f"at most {MAX_MESSAGES} messages"))
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            problems.append(FieldViolation(f"conversation.messages[{i}].role",
                                           f"must be one of {', '.join(ROLES)}; got {m.role!r}"))
        if not m.content.strip():
            problems.append(FieldViolation(f"conversation.messages[{i}].content", "must not be empty"))
    last = len(messages) - 1
    if messages[last].role in ROLES and messages[last].role != "user":
        problems.append(FieldViolation(f"conversation.messages[{last}].role",
                                       f"the last message must be from the user; got {messages[last].role!r}"))
    if c.HasField("retrieval"):
        r = c.retrieval
        q = gateway_pb2.AskQuestion(question=messages[last].content, collection=r.collection, top_k=r.top_k)
        if r.HasField("alpha"):
            q.alpha = r.alpha
        fields = {**_FIELDS, "question": f"conversation.messages[{last}].content"}
        # The last message's emptiness was named above; Ask's rules add its length and the retrieval fields.
        problems += [v for v in question_violations(q, max_top_k, fields)
                     if not (v.field == fields["question"] and not messages[last].content.strip())]
    if problems:
        raise InvalidArgument.of(problems)


@dataclass
class _Choice:
    text: str = ""
    finish_reason: int = common_pb2.FINISH_REASON_UNSPECIFIED
    guard: LeakGuard = field(default_factory=LeakGuard)  # the answer never repeats the system prompt


@dataclass
class _Run:
    """What one generation produced, filled in as it streams."""

    choices: list[_Choice]  # grown as the generator's choices arrive (it bounds n)
    n: int = 1
    started: float = 0.0
    first_token_at: float | None = None
    final: generator_pb2.GenerateStreamResponse = field(default_factory=generator_pb2.GenerateStreamResponse)


@dataclass
class _Prepared:
    """The generation request of a chat, and what retrieval found for it."""

    request: generator_pb2.GenerateStreamRequest
    passages: list[ContextPassage] = field(default_factory=list)
    query: SearchQuery | None = None
    retrieval_s: float = 0.0
    abstain: bool = False  # answer ABSTENTION without the model (nothing retrieved is about the question)


class ChatPipeline:
    """One chat request end to end; Chat aggregates the same stream ChatStream sends."""

    def __init__(self, ask: AskPipeline, downstream: Downstream, count_tokens: TokenCounter):
        self._ask = ask
        self._down = downstream
        self._count = count_tokens

    async def chat(self, conversation: gateway_pb2.ChatConversation,
                   budget: CallBudget) -> gateway_pb2.ChatResponse:
        response = gateway_pb2.ChatResponse()
        texts: dict[int, list[str]] = {}
        logprobs: dict[int, list[common_pb2.TokenLogprob]] = {}
        async for event in self.stream(conversation, budget):
            kind = event.WhichOneof("event")
            if kind == "context":
                response.context.extend(event.context.context)
                response.search_query = event.context.search_query
            elif kind == "delta":
                texts.setdefault(event.delta.index, []).append(event.delta.content)
                logprobs.setdefault(event.delta.index, []).extend(event.delta.logprobs)
            elif kind == "done":
                for choice in event.done.choices:
                    choice.content = "".join(texts.get(choice.index, []))
                    choice.logprobs.extend(logprobs.get(choice.index, []))
                response.choices.extend(event.done.choices)
                response.usage.CopyFrom(event.done.usage)
                response.timing.CopyFrom(event.done.timing)
                response.adapter = event.done.adapter
        return response

    async def stream(self, conversation: gateway_pb2.ChatConversation,
                     budget: CallBudget) -> AsyncIterator[gateway_pb2.ChatStreamResponse]:
        validate_conversation(conversation, self._ask.max_top_k)
        started = time.perf_counter()
        if conversation.HasField("retrieval"):
            prepared = await self._prepare_rag(conversation, budget)
            context_event = gateway_pb2.ChatStreamResponse(context=gateway_pb2.ChatContext(
                context=[_citation(p) for p in prepared.passages], search_query=prepared.query.text))
        else:
            prepared = _Prepared(generator_pb2.GenerateStreamRequest(
                input=_chat_input(conversation.messages), sampling=conversation.sampling,
                adapter=conversation.adapter))
            context_event = None
        sampling = prepared.request.sampling
        run = _Run(choices=[], n=max(1, sampling.n) if sampling.HasField("n") else 1)
        if prepared.abstain:
            # Nothing retrieved is about the question: say so rather than let the model invent an answer.
            run.started = time.perf_counter()
            await self._ask.check(_question(conversation, prepared.query.text), sampling, budget)
            run.choices = [_Choice() for _ in range(run.n)]  # n is the generator's to check: now it has
            yield context_event
            run.first_token_at = time.perf_counter()
            for i, choice in enumerate(run.choices):
                choice.text, choice.finish_reason = ABSTENTION, common_pb2.FINISH_REASON_STOP
                yield gateway_pb2.ChatStreamResponse(delta=gateway_pb2.ChatDelta(index=i, content=ABSTENTION))
        else:
            async for event in self._generate(prepared.request, context_event, run, budget):
                yield event
        generation_s = time.perf_counter() - run.started
        choices = []
        for i, choice in enumerate(run.choices):
            citations = self._citations(choice.text, prepared) if not prepared.abstain else []
            choices.append(gateway_pb2.ChatChoice(index=i, finish_reason=choice.finish_reason, citations=citations))
        yield gateway_pb2.ChatStreamResponse(done=_done(choices, run, started, prepared.retrieval_s, generation_s))

    def _citations(self, text: str, prepared: _Prepared) -> list[gateway_pb2.Citation]:
        if not prepared.passages:
            return []
        return self._ask.citations(text, prepared.query.text, prepared.passages)

    async def search_query(self, conversation: gateway_pb2.ChatConversation, budget: CallBudget) -> SearchQuery:
        """The query retrieval searches with: the last user message itself on a first turn or with
        no_rewrite, else the model's standalone rewrite of it (or the checked fallback)."""
        messages = conversation.messages
        last = messages[-1].content.strip()
        turns = [(m.role, m.content) for m in messages if m.role in ("user", "assistant")]
        if len(turns) < 2 or conversation.retrieval.no_rewrite:
            return SearchQuery(last, AS_WRITTEN)
        # The base model rewrites, greedily: an adapter may have been tuned to answer in a style
        # ("Ahoy! ...") that is no search query.
        sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=REWRITE_MAX_TOKENS, stop=REWRITE_STOP)
        reply = await self._down.generator.generate(generator_pb2.GenerateRequest(
            input=generator_pb2.GenerationInput(prompt=rewrite_prompt(turns)), sampling=sampling), budget)
        query = judge_rewrite(turns, reply.text, reply.finish_reason == common_pb2.FINISH_REASON_STOP)
        log.debug("chat search query (%s): %r", query.source, query.text)
        return query

    async def _prepare_rag(self, conversation: gateway_pb2.ChatConversation, budget: CallBudget) -> _Prepared:
        t0 = time.perf_counter()
        query = await self.search_query(conversation, budget)
        q = _question(conversation, query.text)
        sampling = self._ask.answer_sampling(q)
        top_k = q.top_k or self._ask.default_top_k
        found = await self._ask.retrieve(q, top_k, budget)
        window = await self._ask.window(budget)
        retrieval_s = time.perf_counter() - t0
        options = self._ask.options
        abstain = options.abstain and not q.adapter  # as Ask: an adapter may know the answer itself
        passages: list[ContextPassage] = []
        budget_tokens = window - sampling.max_tokens - _WINDOW_MARGIN
        if not (abstain and not about_the_question(query.text, found)):
            chosen = select_passages(query.text, found, replace(options.selection, top_k=top_k))
            passages = self._ask.fit(query.text, chosen, budget_tokens)
        messages = self._answer_messages(conversation.messages, query.text, passages, budget_tokens)
        request = generator_pb2.GenerateStreamRequest(input=_chat_input(messages), sampling=sampling,
                                                      adapter=q.adapter)
        return _Prepared(request, passages, query, retrieval_s, abstain=abstain and not passages)

    def _answer_messages(self, messages, question: str, passages: list[ContextPassage],
                         budget_tokens: int) -> list[common_pb2.ChatMessage]:
        """Ask's prompt (the passages and the standalone question) with the conversation's earlier turns
        before it and the client's system messages after Ask's instructions; the oldest turns are
        dropped until the prompt fits the window."""
        rag = build_messages(question, passages)
        instructions = [m["content"] for m in rag[:-1]] + [m.content for m in messages if m.role == "system"]
        system = [{"role": "system", "content": "\n\n".join(instructions)}] if instructions else []
        history = [{"role": m.role, "content": m.content} for m in messages[:-1] if m.role != "system"]
        while True:
            prompt = [*system, *history, rag[-1]]
            # A byte-level BPE token covers at least one byte, and the template adds under 8 tokens a
            # message: only a prompt that may be near the window is tokenized.
            bound = sum(len(m["content"].encode()) + 8 for m in prompt) + 8
            if not history or bound <= budget_tokens or self._count.messages(prompt) <= budget_tokens:
                return [common_pb2.ChatMessage(**m) for m in prompt]
            history = history[1:]

    async def _generate(self, request: generator_pb2.GenerateStreamRequest, first_event, run: _Run,
                        budget: CallBudget) -> AsyncIterator[gateway_pb2.ChatStreamResponse]:
        """Streams the generator's choices as delta events, after `first_event` (the context) if any."""
        run.started = time.perf_counter()
        stream = after_first_event(self._down.generator.generate_stream(request, budget), first_event)
        async with contextlib.aclosing(stream):  # leaving early cancels the generator's work at once
            async for part in stream:
                if part is first_event:
                    yield part
                    continue
                if not 0 <= part.index < run.n:
                    raise RuntimeError(f"the generator sent choice {part.index} of {run.n}")
                while len(run.choices) <= part.index:
                    run.choices.append(_Choice())
                choice = run.choices[part.index]
                # A message with a finish reason ends its choice: the guard lets go of what it holds.
                content, logprobs = choice.guard.feed(part.delta, part.logprobs, last=bool(part.finish_reason))
                if content or logprobs:
                    if run.first_token_at is None:
                        run.first_token_at = time.perf_counter()
                    choice.text += content
                    yield gateway_pb2.ChatStreamResponse(delta=gateway_pb2.ChatDelta(
                        index=part.index, content=content, logprobs=logprobs))
                if part.finish_reason:
                    choice.finish_reason = part.finish_reason
                if part.HasField("usage"):  # the last message of the stream
                    run.final = part


def _question(conversation: gateway_pb2.ChatConversation, query: str) -> gateway_pb2.AskQuestion:
    """The Ask question a chat's retrieval amounts to (searching with `query`)."""
    r = conversation.retrieval
    q = gateway_pb2.AskQuestion(question=query, collection=r.collection, top_k=r.top_k, mode=r.mode,
                                adapter=conversation.adapter, sampling=conversation.sampling)
    if r.HasField("alpha"):
        q.alpha = r.alpha
    if r.HasField("filter"):
        q.filter.CopyFrom(r.filter)
    return q


def _chat_input(messages) -> generator_pb2.GenerationInput:
    return generator_pb2.GenerationInput(chat=generator_pb2.ChatMessages(
        messages=[common_pb2.ChatMessage(role=m.role, content=m.content) for m in messages]))


def _citation(p: ContextPassage) -> gateway_pb2.Citation:
    return gateway_pb2.Citation(number=p.number, chunk_id=p.chunk_id, document_id=p.document_id,
                                chunk_index=p.chunk_index, score=p.score, text=p.text)


def _done(choices: list[gateway_pb2.ChatChoice], run: _Run, started: float, retrieval_s: float,
          generation_s: float) -> gateway_pb2.ChatDone:
    total_s = time.perf_counter() - started
    first = run.first_token_at or time.perf_counter()
    return gateway_pb2.ChatDone(
        choices=choices, usage=run.final.usage, adapter=run.final.adapter,
        timing=gateway_pb2.Timing(
            retrieval_ms=retrieval_s * 1000, generation_ms=generation_s * 1000,
            time_to_first_token_ms=(first - started) * 1000, total_ms=total_s * 1000,
            gateway_overhead_ms=max(0.0, (total_s - retrieval_s - generation_s) * 1000),
        ),
    )
