"""Summarises one arm's per-question results: quality with confidence intervals, retrieval,
citations, latency percentiles, tokens, compute, and how many questions failed.

The summary is a plain JSON-ready dict (None where there is nothing to average):

    questions, answered, failed: counts; failed_ids: ids of the questions that failed
    exact_match, token_f1, rouge_l: {"mean", "ci_low", "ci_high"} (95% percentile bootstrap)
    recall_at_k, mrr, citation_precision: {"mean", "n"} over the questions where it applies
    ttft_ms, total_ms: {"p50", "p95"}
    prompt_tokens, completion_tokens, total_tokens, compute_s: means per answered question

Failed questions (`error` set) are counted and listed, and left out of every other number: an
answer that never came has no quality, latency or token count to average.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from gateway.evaluation.metrics import bootstrap_ci, percentile
from gateway.evaluation.results import QuestionResult

QUALITY_METRICS = ("exact_match", "token_f1", "rouge_l")
# summary key -> QuestionResult attribute
OPTIONAL_METRICS = {"recall_at_k": "recall_at_k", "mrr": "reciprocal_rank", "citation_precision": "citation_precision"}
LATENCIES = ("ttft_ms", "total_ms")


def _finite_or_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _with_ci(values: list[float]) -> dict[str, float | None]:
    low, high = bootstrap_ci(values)
    return {"mean": _mean(values), "ci_low": _finite_or_none(low), "ci_high": _finite_or_none(high)}


def summarize_arm(questions: list[QuestionResult]) -> dict:
    """The numbers of one arm, in the shape described in this module's docstring."""
    answered = [q for q in questions if not q.error]
    summary: dict = {
        "questions": len(questions),
        "answered": len(answered),
        "failed": len(questions) - len(answered),
        "failed_ids": [q.item_id for q in questions if q.error],
    }
    for metric in QUALITY_METRICS:
        summary[metric] = _with_ci([getattr(q, metric) for q in answered])
    for key, attribute in OPTIONAL_METRICS.items():
        present = [value for q in answered if (value := getattr(q, attribute)) is not None]
        summary[key] = {"mean": _mean(present), "n": len(present)}
    for latency in LATENCIES:
        values = [getattr(q, latency) for q in answered]
        summary[latency] = {q: _finite_or_none(percentile(values, n)) for q, n in (("p50", 50), ("p95", 95))}
    summary["prompt_tokens"] = _mean([q.prompt_tokens for q in answered])
    summary["completion_tokens"] = _mean([q.completion_tokens for q in answered])
    summary["total_tokens"] = _mean([q.prompt_tokens + q.completion_tokens for q in answered])
    summary["compute_s"] = _mean([q.compute_s for q in answered])
    return summary
