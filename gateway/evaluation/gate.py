"""A promotion gate's verdict: the candidate version against what the alias serves today, compared
question by question on one metric; the alias moves only when the lower 95% bound of the paired
improvement clears the margin. A question either arm failed scores 0 for that arm, so a
candidate that errors can never win by answering less."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

from gateway.evaluation.metrics import bootstrap_ci
from gateway.evaluation.results import ArmResult, QuestionResult
from ragtune.gate_metrics import gate_metric_name

METRICS = ("token_f1", "exact_match", "rouge_l", "citation_precision")


@dataclass(frozen=True)
class Verdict:
    promoted: bool
    alias: str
    candidate_version: int
    incumbent_version: int
    metric: str
    candidate_mean: float
    incumbent_mean: float
    improvement: float
    improvement_ci_low: float
    improvement_ci_high: float
    margin: float
    reason: str
    evaluation_id: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def _score(result: QuestionResult, metric: str) -> float:
    if result.error:
        return 0.0
    value = getattr(result, metric)
    return float(value) if value is not None else 0.0


def decide(candidate: ArmResult, incumbent: ArmResult, *, metric: str, margin: float, alias: str,
           candidate_version: int, incumbent_version: int, evaluation_id: str = "") -> Verdict:
    if metric not in METRICS:
        raise ValueError(f"unknown gate metric {metric!r}")
    pairs = [(_score(c, metric), _score(i, metric)) for c, i in zip(candidate.questions, incumbent.questions)]
    against = f"version {incumbent_version}" if incumbent_version else "the base model"
    if not pairs:
        return Verdict(False, alias, candidate_version, incumbent_version, metric, 0.0, 0.0, 0.0, 0.0, 0.0, margin,
                       "held back: the gate's eval set produced no answers", evaluation_id)
    differences = [c - i for c, i in pairs]
    improvement = statistics.fmean(differences)
    low, high = bootstrap_ci(differences)
    if math.isnan(low):
        low = high = improvement
    candidate_mean = statistics.fmean(c for c, _ in pairs)
    incumbent_mean = statistics.fmean(i for _, i in pairs)
    promoted = low > margin
    numbers = (f"{metric} {candidate_mean:.3f} vs {incumbent_mean:.3f} for {against}: improvement {improvement:+.3f} "
               f"(95% CI {low:+.3f} to {high:+.3f}) over {len(pairs)} questions; margin {margin:.3f}")
    if promoted:
        reason = f"promoted: the lower bound of the improvement clears the margin; {numbers}"
    else:
        reason = f"held back: the lower bound of the improvement does not clear the margin; {numbers}"
    return Verdict(promoted, alias, candidate_version, incumbent_version, metric, candidate_mean, incumbent_mean,
                   improvement, low, high, margin, reason, evaluation_id)


def failed(gate_run, error: str, evaluation_id: str) -> Verdict:
    """The verdict when the gate's evaluation itself could not finish: the alias stays."""
    return Verdict(False, gate_run.gate.alias, gate_run.candidate_version, gate_run.incumbent_version,
                   gate_metric_name(gate_run.gate.metric), 0.0, 0.0, 0.0, 0.0, 0.0, gate_run.gate.margin,
                   f"held back: the gate's evaluation ended without a result ({error})", evaluation_id)

