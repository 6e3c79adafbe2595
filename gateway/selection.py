"""What of the retrieved chunks goes in the prompt: the sentences that bear on the question, ranked,
near-duplicates dropped; and whether anything retrieved is about the question at all.

A 135M-parameter model answers better from three short relevant sentences than from four 200-token
chunks (fewer distractions, and far fewer prompt tokens to read before the first answer token).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from gateway.evidence import analysed, best_window, idf, key_terms, starts_with_reference, terms, weight
from gateway.prompting import ContextPassage


@dataclass(frozen=True)
class Selection:
    """How passages are chosen (each field is one lever the answer benchmark measures)."""

    top_k: int = 4
    trim: bool = True  # keep only the sentences that bear on the question
    max_sentences: int = 3
    max_words: int = 80
    rerank: bool = True  # order by the kept sentences' question-term weight, not by retrieval score
    dedupe: bool = True  # drop a passage whose kept words largely hold, or are held by, a kept passage's
    drop_unrelated: bool = True  # drop passages that share no term with the question
    min_share: float = 0.5  # drop passages weighing less than this share of the best one's question terms
    best_last: bool = False  # the strongest passage nearest the question instead of first


@dataclass(frozen=True)
class _Scored:
    passage: ContextPassage
    relevance: float
    terms: frozenset[str]


def _trim(text: str, q_terms: set[str], weights: dict[str, float], s: Selection) -> tuple[str, frozenset[str]]:
    """The passage cut to its question-bearing sentences (kept in their order), and the kept terms.
    A passage already within max_words stays whole: there is nothing to gain and context to lose."""
    parts, part_terms = zip(*analysed(text))
    if not s.trim or len(text.split()) <= s.max_words:
        return text, frozenset().union(*part_terms)
    scores = [weight(q_terms & t, weights, 0.0) for t in part_terms]
    best = max(range(len(parts)), key=lambda i: scores[i])
    keep = {best}
    if best > 0 and starts_with_reference(parts[best]):
        keep.add(best - 1)  # "Its capital is Ostrel." needs the sentence that names "it"
    if best + 1 < len(parts) and starts_with_reference(parts[best + 1]) and scores[best + 1] > 0:
        keep.add(best + 1)  # "X is ... . It was invented by ..." continues about the same thing
    for i in sorted(range(len(parts)), key=lambda i: -scores[i]):
        if len(keep) >= s.max_sentences:
            break
        if scores[i] > 0 and scores[i] >= 0.5 * scores[best]:
            keep.add(i)
    kept = " ".join(parts[i] for i in sorted(keep))
    words = kept.split()
    if len(words) > s.max_words:  # one long "sentence" (a list, a table row): the window richest in question terms
        start, end = best_window(words, q_terms, s.max_words)
        kept = " ".join(words[start:end])
        return kept, frozenset(terms(kept))
    return kept, frozenset().union(*(part_terms[i] for i in keep))


def _identifying(question: str, q_terms: set[str], weights: dict[str, float]) -> set[str]:
    """The terms that say which thing a question is about: its names (capitalised words), else its
    rarest terms among the candidates ("quillfish" in "In which lake is the quillfish found?")."""
    names, _ = key_terms(question)
    if names:
        return names
    present = {t: weights[t] for t in q_terms if t in weights}
    top = max(present.values(), default=0.0)
    return {t for t, w in present.items() if w >= top}


def select_passages(question: str, candidates: Sequence[ContextPassage], s: Selection) -> list[ContextPassage]:
    """At most s.top_k passages for the prompt, renumbered from 1 in prompt order."""
    q_terms = set(terms(question))
    weights = idf((t for c in candidates for _, t in analysed(c.text)), q_terms)
    scored: list[_Scored] = []
    for c in candidates:
        text, kept_terms = _trim(c.text, q_terms, weights, s)
        relevance = weight(q_terms & kept_terms, weights, 0.0)
        if s.drop_unrelated and relevance <= 0:
            continue
        scored.append(_Scored(replace(c, text=text), relevance, kept_terms))
    if s.rerank:
        scored.sort(key=lambda x: -x.relevance)  # stable: retrieval order breaks ties
    identifying = _identifying(question, q_terms, weights)
    best = max((x.relevance for x in scored), default=0.0)
    best_identity = max((weight(identifying & x.terms, weights, 0.0) for x in scored), default=0.0)
    kept: list[_Scored] = []
    for x in scored:
        # A passage without what identifies the question's subject is about something else, and a small
        # model readily answers from it instead ("the capital of Velmora" from Tarsk's passage).
        weak = x.relevance < s.min_share * best
        other = weight(identifying & x.terms, weights, 0.0) < s.min_share * best_identity
        if weak or other:
            continue
        if s.dedupe and any(_contained(x.terms, k.terms) or _contained(k.terms, x.terms) for k in kept):
            continue
        kept.append(x)
        if len(kept) == s.top_k:
            break
    if s.best_last:
        kept.reverse()
    return [replace(x.passage, number=i + 1) for i, x in enumerate(kept)]


def _contained(small: frozenset[str], big: frozenset[str], share: float = 0.8) -> bool:
    return bool(small) and len(small & big) >= share * len(small)


def about_the_question(question: str, passages: Sequence[ContextPassage]) -> bool:
    """False when no passage mentions what the question names: none holds all of its numbers and at
    least half of its names (capitalised words), or, for a question without names, none shares a
    content word with it. The model is then not asked: it would only invent an answer."""
    if not passages:
        return False
    names, numbers = key_terms(question)
    texts = [frozenset().union(*(t for _, t in analysed(p.text))) for p in passages]
    if not names and not numbers:
        q_terms = set(terms(question))
        return any(q_terms & found for found in texts)
    for found in texts:
        if numbers <= found and (not names or len(names & found) * 2 >= len(names)):
            return True
    return False
