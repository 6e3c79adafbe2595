"""How the answer benchmark scores one answer (reference found, stale value back, abstained) and sums
a group of answers into the figures of its table."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from bench.answers_data import Item
from bench.common import summary


@dataclass
class StreamedAnswer:
    """What one AskStream sent (through the gateway or the pipeline in process), as it arrived."""

    started: float  # time.perf_counter() when the request went out
    parts: list[str] = field(default_factory=list)
    context: list = field(default_factory=list)
    done: object = None
    ttft: float | None = None

    def take(self, event) -> None:
        kind = event.WhichOneof("event")
        if kind == "delta":
            self.ttft = self.ttft or time.perf_counter() - self.started
            self.parts.append(event.delta)
        elif kind == "context":
            self.context = list(event.context.context)
        elif kind == "done":
            self.done = event.done

# Ways a small model says the documents do not answer (it rarely uses the exact requested phrase).
_ABSTAIN = re.compile(
    r"\b(?:do(?:es)? not|don't|doesn't|cannot|can't|unable to|did not|didn't)\s+(?:\w+\s+){0,2}?"
    r"(?:say|know|mention|specify|state|provide|contain|include|find|answer|determine|give|tell)"
    r"|\bnot\s+(?:mentioned|specified|stated|provided|given|available|known|included|found)\b"
    r"|\bno\s+(?:information|mention|details|data|answer)\b|\bunknown\b",
    re.IGNORECASE,
)


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower().replace("’", "'"))


def contains(answer: str, reference: str) -> bool:
    """The reference as whole words (a plural ending allowed), case- and apostrophe-insensitive."""
    pattern = r"(?<![a-z0-9])" + re.escape(_norm(reference)) + r"(?:s|es)?(?![a-z0-9])"
    return re.search(pattern, _norm(answer)) is not None


def abstained(answer: str) -> bool:
    return bool(_ABSTAIN.search(answer)) or not answer.strip()


@dataclass
class Answer:
    """One arm's answer to one question, scored."""

    arm: str
    item: str
    kind: str
    question: str
    answer: str
    latency_ms: float
    ttft_ms: float
    correct: bool = False
    abstained: bool = False
    stale: bool = False
    gold_in_context: bool | None = None
    context_documents: list[str] = field(default_factory=list)  # one per passage in the prompt
    cited_documents: list[str] = field(default_factory=list)
    citations_inferred: bool = False
    cited_gold_only: bool | None = None
    stale_in_context: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    server_timing_ms: dict[str, float] = field(default_factory=dict)


FINISH_REASONS = {0: "", 1: "stop", 2: "length", 3: "abort"}  # the proto FinishReason enum, as the JSON names it


def from_done(arm: str, item: Item, text: str, context, done, elapsed: float, ttft: float | None) -> Answer:
    """The unscored Answer of a streamed AskStream (its text, context and done event), however it was asked:
    through the gateway (answers_bench) or a lever's pipeline in process (answers_levers)."""
    t = done.timing
    return Answer(
        arm, item.id, item.kind, item.question, text, elapsed * 1000, (ttft or elapsed) * 1000,
        gold_in_context=item.gold_document in {c.document_id for c in context},
        context_documents=[c.document_id for c in context],
        cited_documents=[c.document_id for c in done.citations],
        citations_inferred=any(c.inferred for c in done.citations),
        stale_in_context=any(s.lower() in c.text.lower() for c in context for s in item.stale),
        prompt_tokens=done.usage.prompt_tokens, completion_tokens=done.usage.completion_tokens,
        finish_reason=FINISH_REASONS.get(done.finish_reason, str(done.finish_reason)),
        server_timing_ms={"retrieval": t.retrieval_ms, "generation": t.generation_ms,
                          "ttft": t.time_to_first_token_ms, "total": t.total_ms, "overhead": t.gateway_overhead_ms},
    )


def score(a: Answer, answers: tuple[str, ...], stale: tuple[str, ...], gold: str, citations: bool) -> Answer:
    a.abstained = abstained(a.answer)
    a.stale = any(contains(a.answer, s) for s in stale)
    if answers:
        a.correct = any(contains(a.answer, r) for r in answers) and not a.stale
    else:
        a.correct = a.abstained  # unanswerable: the right answer is to say so
    if citations:
        a.cited_gold_only = set(a.cited_documents) == {gold} if answers else not a.cited_documents
    return a


def tally(answers: list[Answer]) -> dict:
    """The table's figures for one (arm, kind) group."""
    correct = [a for a in answers if a.correct]
    cited = [a for a in correct if a.cited_gold_only is not None]
    row = {
        "n": len(answers),
        "correct": len(correct),
        "abstained": sum(a.abstained for a in answers),
        "stale": sum(a.stale for a in answers),
        "stale_in_context": sum(a.stale_in_context for a in answers),
        "gold_in_context": sum(bool(a.gold_in_context) for a in answers if a.gold_in_context is not None),
        "latency_ms": summary([a.latency_ms for a in answers]),
        "ttft_ms": summary([a.ttft_ms for a in answers]),
        "prompt_tokens_mean": sum(a.prompt_tokens for a in answers) / max(1, len(answers)),
        "passages_mean": sum(len(a.context_documents) for a in answers) / max(1, len(answers)),
        "completion_tokens_mean": sum(a.completion_tokens for a in answers) / max(1, len(answers)),
    }
    if cited:
        row["cited_gold_only"] = sum(a.cited_gold_only for a in cited)
        row["cited_gold_only_of_correct"] = row["cited_gold_only"] / len(cited)
    return row
