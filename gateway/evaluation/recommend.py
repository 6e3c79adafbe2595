"""Derives which arm to use from the measured numbers and the user's constraints, saying why.

The rule, in order:
1. Arms that failed, that failed on more than MAX_FAILED_SHARE of their questions, whose p95 total
   latency exceeds the latency budget, or whose mean tokens per answer exceed the cost budget are
   out. Nothing left: the recommendation is "none", with the reasons.
2. When the data changes often (weekly, daily, realtime) and the measured knowledge update took
   fine-tuning at least FAR_LONGER times as long as ingesting, the retrieval arms (whose knowledge
   is refreshed by ingest alone) are preferred, unless a non-retrieval arm is clearly better: its
   token-F1 CI lower bound lies above the best retrieval arm's CI upper bound.
3. Otherwise the best mean token F1 wins; arms whose CIs overlap it count as tied, and a tie goes to
   the lower p95 total latency, then to fewer tokens per answer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ragtune.errors import FieldViolation, InvalidArgument

from gateway.evaluation.results import ArmResult, Constraints, KnowledgeUpdate, Recommendation
from gateway.evaluation.summary import summarize_arm

DATA_CHANGE = ("static", "monthly", "weekly", "daily", "realtime")
FREQUENT_CHANGE = ("weekly", "daily", "realtime")
RETRIEVAL_ARMS = ("rag", "rag_finetuned")
# Below this ratio both ways refresh knowledge within the same order of time, so update cost is
# not worth giving up quality for.
FAR_LONGER = 5.0
# An arm that failed more often than this is scored on a subset of the questions the others answered,
# so its means are not comparable with theirs.
MAX_FAILED_SHARE = 0.2


@dataclass(frozen=True)
class _Candidate:
    name: str
    f1: float
    ci_low: float
    ci_high: float
    p95_ms: float
    tokens: float

    def overlaps(self, other: _Candidate) -> bool:
        return self.ci_low <= other.ci_high and other.ci_low <= self.ci_high

    def quality(self) -> str:
        return f"token F1 {self.f1:.3f} (95% CI {self.ci_low:.3f}-{self.ci_high:.3f})"


def validate_constraints(constraints: Constraints) -> None:
    """InvalidArgument naming each constraint that cannot be used (field names as in the request)."""
    problems = []
    if constraints.data_change not in DATA_CHANGE:
        problems.append(FieldViolation("constraints.data_change", f"must be one of {', '.join(DATA_CHANGE)}"))
    if constraints.latency_budget_ms is not None and not constraints.latency_budget_ms > 0:
        problems.append(FieldViolation("constraints.latency_budget_ms", "must be a positive number of milliseconds"))
    if constraints.cost_budget_tokens is not None and not constraints.cost_budget_tokens > 0:
        problems.append(FieldViolation("constraints.cost_budget_tokens", "must be a positive number of tokens"))
    if problems:
        raise InvalidArgument.of(problems)


def _admit(arm: ArmResult, constraints: Constraints, excluded: dict[str, str]) -> _Candidate | None:
    """The arm as a candidate, or None with the reason recorded in `excluded`."""
    if arm.failed:
        excluded[arm.name] = f"{arm.name} failed, so it was not considered: {arm.error or 'no error given'}."
        return None
    summary = arm.summary or summarize_arm(arm.questions)
    if summary["questions"] == 0:
        excluded[arm.name] = f"{arm.name} has no results: it did not run."
        return None
    if summary["answered"] == 0:
        excluded[arm.name] = f"{arm.name} answered none of its {summary['questions']} questions."
        return None
    share = summary["failed"] / summary["questions"]
    if share > MAX_FAILED_SHARE:
        excluded[arm.name] = (
            f"{arm.name} failed on {summary['failed']} of {summary['questions']} questions ({share:.0%}, "
            f"more than the {MAX_FAILED_SHARE:.0%} allowed), so its scores are not comparable."
        )
        return None
    f1 = summary["token_f1"]
    candidate = _Candidate(
        arm.name, f1["mean"], f1["ci_low"], f1["ci_high"], summary["total_ms"]["p95"], summary["total_tokens"]
    )
    budget = constraints.latency_budget_ms
    if budget is not None and candidate.p95_ms > budget:
        excluded[arm.name] = f"{arm.name} is over the latency budget: p95 {candidate.p95_ms:.0f} ms > {budget:.0f} ms."
        return None
    budget = constraints.cost_budget_tokens
    if budget is not None and candidate.tokens > budget:
        excluded[arm.name] = (
            f"{arm.name} is over the cost budget: {candidate.tokens:.0f} tokens per answer > {budget:.0f}."
        )
        return None
    return candidate


def _best(candidates: list[_Candidate], scope: str = "") -> tuple[_Candidate, list[str]]:
    """The pick by quality, ties (overlapping CIs) broken by latency then tokens, and why."""
    top = max(candidates, key=lambda c: c.f1)
    tied = [c for c in candidates if c.overlaps(top)]
    pick = min(tied, key=lambda c: (c.p95_ms, c.tokens, -c.f1))
    if len(tied) == 1:
        return pick, [f"{pick.name} has the best {pick.quality()}{scope}, and no other arm's CI overlaps it."]
    others = [c for c in tied if c is not pick]
    listed = "; ".join(f"{c.name}: {c.quality()}, p95 {c.p95_ms:.0f} ms, {c.tokens:.0f} tokens" for c in others)
    why = "lower p95 latency" if all(pick.p95_ms < c.p95_ms for c in others) else "lower latency or fewer tokens"
    return pick, [
        f"{pick.name} ({pick.quality()}, p95 {pick.p95_ms:.0f} ms, {pick.tokens:.0f} tokens per answer) is tied on "
        f"quality with {listed} (overlapping CIs){scope}, and wins the tie on {why}."
    ]


def _update_ratio(update: KnowledgeUpdate | None) -> float | None:
    if update is None or update.error or not update.rag_seconds or not update.finetune_seconds:
        return None
    return update.finetune_seconds / update.rag_seconds


def _update_reasons(update: KnowledgeUpdate | None, ratio: float | None, change: str) -> list[str]:
    if change not in FREQUENT_CHANGE:
        return [f"The data changes {change}, so the cost of updating knowledge weighed little."]
    if ratio is None:
        why = f"it failed: {update.error}" if update and update.error else "it was not measured"
        return [f"The data changes {change}, but the knowledge-update cost could not weigh in: {why}."]
    text = (
        f"The data changes {change}; making {update.facts} new facts answerable took {update.finetune_seconds:.1f} s "
        f"by fine-tuning against {update.rag_seconds:.1f} s by ingesting ({ratio:.1f}x)"
    )
    rag_f1, ft_f1 = update.rag_quality.get("token_f1"), update.finetune_quality.get("token_f1")
    if rag_f1 is not None and ft_f1 is not None:
        text += f", with token F1 {rag_f1:.3f} through RAG and {ft_f1:.3f} through fine-tuning afterwards"
    if ratio >= FAR_LONGER:
        return [text + ", so the retrieval arms, which take new facts by ingest alone, are preferred."]
    return [text + f", less than {FAR_LONGER:.0f}x, so update cost did not decide."]


def recommend(
    arms: list[ArmResult], knowledge_update: KnowledgeUpdate | None, constraints: Constraints
) -> Recommendation:
    """The arm to use, sentences quoting the numbers behind it, and those numbers in `drivers`."""
    validate_constraints(constraints)
    excluded: dict[str, str] = {}
    candidates = [c for arm in arms if (c := _admit(arm, constraints, excluded)) is not None]
    ratio = _update_ratio(knowledge_update)
    drivers: dict = {
        "constraints": asdict(constraints),
        "arms": {c.name: {"token_f1": c.f1, "ci_low": c.ci_low, "ci_high": c.ci_high, "p95_total_ms": c.p95_ms,
                          "mean_tokens": c.tokens} for c in candidates},
        "excluded": excluded,
        "knowledge_update": None if knowledge_update is None else asdict(knowledge_update),
        "update_cost_ratio": ratio,
    }
    ruled_out = list(excluded.values())
    if not candidates:
        why = "no arms were run" if not arms else "every arm was ruled out"
        return Recommendation("none", [f"No arm can be recommended: {why}.", *ruled_out], drivers)
    update = _update_reasons(knowledge_update, ratio, constraints.data_change)
    prefer_retrieval = constraints.data_change in FREQUENT_CHANGE and ratio is not None and ratio >= FAR_LONGER
    retrieval = [c for c in candidates if c.name in RETRIEVAL_ARMS]
    if prefer_retrieval and retrieval:
        best_retrieval, why = _best(retrieval, " among the retrieval arms")
        clearly_better = [c for c in candidates if c.name not in RETRIEVAL_ARMS and c.ci_low > best_retrieval.ci_high]
        if clearly_better:
            pick, why = _best(clearly_better, " among the arms clearly above the retrieval arms")
            why.append(
                f"{pick.name} is clearly better on quality despite the update cost: its CI lower bound "
                f"{pick.ci_low:.3f} is above the best retrieval arm {best_retrieval.name}'s upper bound "
                f"{best_retrieval.ci_high:.3f}."
            )
        else:
            pick = best_retrieval
            better = [c for c in candidates if c.name not in RETRIEVAL_ARMS and c.f1 > pick.f1]
            why += [
                f"{c.name} scored higher ({c.quality()}) but not clearly: its CI lower bound {c.ci_low:.3f} is not "
                f"above {pick.name}'s upper bound {pick.ci_high:.3f}." for c in better
            ]
        drivers["rule"] = "frequent data change with costly fine-tuning updates: retrieval arms preferred"
    else:
        pick, why = _best(candidates)
        if prefer_retrieval:
            why.append("No retrieval arm was left to prefer, so the choice was made on quality alone.")
        drivers["rule"] = "best token F1; overlapping CIs broken by p95 latency, then tokens"
    drivers["chosen"] = pick.name
    return Recommendation(pick.name, why + update + ruled_out, drivers)
