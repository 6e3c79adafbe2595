"""Answer, retrieval and latency metrics of an evaluation: plain functions on strings and numbers.

Answer metrics follow the SQuAD evaluation script: both the prediction and every reference are
normalised (`normalize_answer`), then compared; each metric takes the best score over the
references, because any one correct reference makes the answer correct.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

from ragtune.stats import percentile  # noqa: F401 - re-exported for summary and reports

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# Jeopardy answers are phrased as questions ("What is Paris?") while references hold the bare answer
# ("Paris"). The frame says nothing about the answer itself, so it is dropped, but only at the very
# start and only when something follows it: "what is" alone, or a frame in mid-sentence, stays.
# It is applied to references too, so a reference written as "Who is Shakespeare" still matches.
_QUESTION_FRAME = re.compile(r"^(?:what|who|where) (?:is|are|was|were) (?=\S)")


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, a leading Jeopardy question frame and the articles a/an/the, and
    collapse whitespace: "What is the Eiffel Tower?" -> "eiffel tower"."""
    text = " ".join(text.lower().translate(_PUNCTUATION).split())
    text = _QUESTION_FRAME.sub("", text)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals some normalised reference, else 0.0."""
    answer = normalize_answer(prediction)
    return max((1.0 if answer == normalize_answer(ref) else 0.0 for ref in references), default=0.0)


def _f1(precision: float, recall: float) -> float:
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _token_f1_one(prediction: list[str], reference: list[str]) -> float:
    if not prediction or not reference:
        # SQuAD's convention: two empty answers agree, one empty answer matches nothing.
        return float(prediction == reference)
    common = sum((Counter(prediction) & Counter(reference)).values())
    if common == 0:
        return 0.0
    return _f1(common / len(prediction), common / len(reference))


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """F1 of the bag of normalised tokens shared with a reference, best over the references."""
    predicted = _tokens(prediction)
    return max((_token_f1_one(predicted, _tokens(ref)) for ref in references), default=0.0)


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def _rouge_l_one(prediction: list[str], reference: list[str]) -> float:
    if not prediction or not reference:
        return float(prediction == reference)
    lcs = _lcs_length(prediction, reference)
    return _f1(lcs / len(prediction), lcs / len(reference))


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure (beta 1): the longest common token subsequence over the normalised
    prediction and reference lengths, best over the references."""
    predicted = _tokens(prediction)
    return max((_rouge_l_one(predicted, _tokens(ref)) for ref in references), default=0.0)


def bootstrap_ci(
    values: Sequence[float], *, resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean; the same seed gives the same interval."""
    import numpy as np

    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError("resamples must be >= 1 and confidence in (0, 1)")
    if len(values) == 0:
        return (math.nan, math.nan)
    data = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return (float(low), float(high))


def recall_at_k(retrieved_ids: Sequence[str], gold_ids: Sequence[str], k: int) -> float | None:
    """Share of the distinct gold documents found among the first k retrieved; None without gold ids."""
    if k < 1:
        raise ValueError("k must be >= 1")
    gold = set(gold_ids)
    if not gold:
        return None
    return len(gold & set(retrieved_ids[:k])) / len(gold)


def reciprocal_rank(retrieved_ids: Sequence[str], gold_ids: Sequence[str]) -> float | None:
    """1 / the rank of the first retrieved gold document (0.0 when none is); None without gold ids."""
    gold = set(gold_ids)
    if not gold:
        return None
    return next((1.0 / rank for rank, doc in enumerate(retrieved_ids, start=1) if doc in gold), 0.0)


def citation_precision(cited_ids: Sequence[str], gold_ids: Sequence[str]) -> float | None:
    """Share of the citations (one per cited chunk) that point into a gold document; None when nothing
    was cited or there are no gold ids to judge the citations by."""
    gold = set(gold_ids)
    if not cited_ids or not gold:
        return None
    return sum(1 for doc in cited_ids if doc in gold) / len(cited_ids)
