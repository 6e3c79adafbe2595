"""The records an evaluation produces: one per question and arm, summaries per arm, the whole run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ARMS = ("base", "rag", "finetuned", "rag_finetuned")


@dataclass(frozen=True)
class EvalItem:
    """One line of an eval set."""

    id: str
    question: str
    references: list[str]
    gold_document_ids: list[str] = field(default_factory=list)


@dataclass
class QuestionResult:
    """One question answered by one arm, with its scores."""

    item_id: str
    question: str
    references: list[str]
    answer: str = ""
    error: str = ""  # set when this question failed in this arm
    exact_match: float = 0.0
    token_f1: float = 0.0
    rouge_l: float = 0.0
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    compute_s: float = 0.0  # seconds the retriever and generator worked on this answer
    retrieved_document_ids: list[str] = field(default_factory=list)
    cited_document_ids: list[str] = field(default_factory=list)
    recall_at_k: float | None = None  # None without gold ids or without retrieval
    reciprocal_rank: float | None = None
    citation_precision: float | None = None


@dataclass
class ArmResult:
    """All questions of one arm; `failed` with `error` when the arm could not run at all."""

    name: str
    questions: list[QuestionResult] = field(default_factory=list)
    failed: bool = False
    error: str = ""
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class KnowledgeUpdate:
    """Cost of making N new facts answerable through RAG (ingest) against fine-tuning (a job)."""

    facts: int
    rag_seconds: float | None = None
    finetune_seconds: float | None = None
    rag_quality: dict[str, float] = field(default_factory=dict)  # e.g. {"token_f1": ..., "exact_match": ...}
    finetune_quality: dict[str, float] = field(default_factory=dict)
    error: str = ""


@dataclass
class Constraints:
    """What the user states about their use case; drives the recommendation with the numbers."""

    data_change: str = "monthly"  # static | monthly | weekly | daily | realtime
    latency_budget_ms: float | None = None  # p95 total latency an answer may take
    cost_budget_tokens: float | None = None  # mean prompt + completion tokens an answer may use


@dataclass
class Recommendation:
    arm: str
    reasons: list[str]
    drivers: dict[str, Any]


@dataclass
class EvalRun:
    """A whole evaluation: its inputs, every arm's results, and what it concluded."""

    id: str
    collection: str
    adapter: str
    top_k: int
    arms: list[ArmResult]
    constraints: Constraints
    knowledge_update: KnowledgeUpdate | None = None
    recommendation: Recommendation | None = None
    created_time: str = ""
