"""One question through one arm: asked through the same AskPipeline that serves Ask, then scored."""

from __future__ import annotations

import time

import grpc

from ragtune.errors import ServiceError
from ragtune.v1 import gateway_pb2
from gateway.downstream import CallBudget
from gateway.evaluation.metrics import (
    citation_precision,
    exact_match,
    recall_at_k,
    reciprocal_rank,
    rouge_l,
    token_f1,
)
from gateway.evaluation.results import ArmResult, EvalItem, QuestionResult
from gateway.rag import AskPipeline

QUESTION_TIMEOUT_S = 300.0


def describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, ServiceError):
        return f"{exc.code.name}: {exc.message}"
    return f"{type(exc).__name__}: {exc}"


async def ask_and_score(pipeline: AskPipeline, tenant: str, item: EvalItem, spec: gateway_pb2.EvaluationSpec,
                        retrieval: bool, collection: str, adapter: str) -> QuestionResult:
    """A question that fails (the generator refuses the adapter, say) is a result with `error` set."""
    q = gateway_pb2.AskQuestion(
        question=item.question, collection=collection if retrieval else "", no_retrieval=not retrieval,
        adapter=adapter, top_k=spec.top_k,
    )
    q.sampling.CopyFrom(spec.sampling)
    if not q.sampling.HasField("max_tokens"):
        q.sampling.max_tokens = 64
    result = QuestionResult(item_id=item.id, question=item.question, references=item.references)
    budget = CallBudget(tenant=tenant, deadline=time.monotonic() + QUESTION_TIMEOUT_S)
    try:
        reply = await pipeline.ask(q, budget)
    except (ServiceError, grpc.aio.AioRpcError) as exc:
        result.error = describe(exc)
        return result
    result.answer = reply.answer
    result.exact_match = exact_match(reply.answer, item.references)
    result.token_f1 = token_f1(reply.answer, item.references)
    result.rouge_l = rouge_l(reply.answer, item.references)
    result.ttft_ms = reply.timing.time_to_first_token_ms
    result.total_ms = reply.timing.total_ms
    result.prompt_tokens = reply.usage.prompt_tokens
    result.completion_tokens = reply.usage.completion_tokens
    result.compute_s = (reply.timing.retrieval_ms + reply.timing.generation_ms) / 1000
    result.retrieved_document_ids = [c.document_id for c in reply.context]
    result.cited_document_ids = [c.document_id for c in reply.citations]
    if retrieval and item.gold_document_ids:
        k = len(reply.context) or spec.top_k or 4
        result.recall_at_k = recall_at_k(result.retrieved_document_ids, item.gold_document_ids, k)
        result.reciprocal_rank = reciprocal_rank(result.retrieved_document_ids, item.gold_document_ids)
        result.citation_precision = citation_precision(result.cited_document_ids, item.gold_document_ids)
    return result


def quality(arm: ArmResult) -> dict[str, float]:
    """Mean token F1 and exact match over the questions that were answered."""
    ok = [q for q in arm.questions if not q.error]
    if not ok:
        return {}
    return {
        "token_f1": sum(q.token_f1 for q in ok) / len(ok),
        "exact_match": sum(q.exact_match for q in ok) / len(ok),
    }
