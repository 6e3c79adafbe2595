"""Which passage an answer came from: the one whose sentences hold the answer's own facts.

Small models seldom write [n] marks, and the marks they write are often wrong; plain word overlap
picks whichever passage repeats the question's words. What identifies the source is what the answer
adds to the question ("October", "Edith Sorrel"), weighted by how rare each term is among the
passages, found within one or two adjacent sentences. Such citations are flagged as inferred.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from gateway.evidence import analysed, idf, rarest, terms, weight
from gateway.prompting import ContextPassage, is_abstention

# Below this share of the answer's new terms found in one passage (and fewer than MIN_TERMS of them),
# nothing is cited: the answer is not grounded in any passage (an invented answer must not borrow a
# citation). Small models pad a grounded answer with invented asides ("..., which is a ..."), so two
# distinctive terms found together are enough.
MIN_SUPPORT = 0.25
MIN_TERMS = 2
# Words about the documents rather than from them ("The document states that ...").
_META = frozenset(terms("document documents passage passages text context states stated according mentions"
                        " mentioned says answer question"))


@dataclass(frozen=True)
class Attribution:
    numbers: list[int]  # passage numbers, best supported first
    inferred: bool  # found by the answer's content, not by [n] marks the model wrote


def _windows(text: str) -> list[frozenset[str]]:
    """Term sets of each sentence and of each pair of adjacent sentences (a fact may span "X is ... .
    It ...")."""
    parts = [t for _, t in analysed(text)]
    return parts + [a | b for a, b in zip(parts, parts[1:])]


def _supported(windows: list[frozenset[str]], wanted: set[str], weights: dict[str, float]) -> set[str]:
    """The wanted terms that the passage's best window holds."""
    return set(max(windows, key=lambda w: weight(wanted & w, weights, 0.0)) & wanted)


def attribute(answer: str, question: str, passages: Sequence[ContextPassage],
              marked: Sequence[int] = ()) -> Attribution:
    """The passages that support `answer`. Marks the model wrote ([n], given as `marked`) are kept
    when their passage supports the answer about as well as the best one; otherwise inferred."""
    if not passages or is_abstention(answer):
        return Attribution([], False)
    new = (set(terms(answer)) - set(terms(question)) or set(terms(answer))) - _META
    windows = {p.number: _windows(p.text) for p in passages}
    units = [t for p in passages for _, t in analysed(p.text)]
    weights = idf(units, new)
    # Terms no passage holds weigh as much as the rarest can: invented content counts against.
    total = weight(new, weights, rarest(len(units)))
    if total <= 0:
        return Attribution([], False)
    held = {n: _supported(ws, new, weights) for n, ws in windows.items()}
    support = {n: weight(found, weights, 0.0) for n, found in held.items()}
    best = max(support, key=lambda n: (support[n], -n))
    if support[best] < MIN_SUPPORT * total and len(held[best]) < MIN_TERMS:
        return Attribution([], False)
    verified = [n for n in marked if support.get(n, 0.0) >= 0.8 * support[best]]
    if verified:
        return Attribution(verified, False)
    cited = [best]
    # A second source only for facts the first does not hold (an answer joining two passages).
    rest = new - held[best]
    if rest:
        extra = {n: weight(_supported(ws, rest, weights), weights, 0.0) for n, ws in windows.items() if n != best}
        second = max(extra, key=lambda n: (extra[n], -n), default=None)
        if second is not None and extra[second] >= MIN_SUPPORT * total:
            cited.append(second)
    return Attribution(cited, True)
