"""Hybrid ranking: Weaviate's relativeScoreFusion (min-max normalise each result list, weight by alpha, sum)."""

from __future__ import annotations

from dataclasses import replace
from operator import attrgetter
from typing import Callable, Hashable, TypeVar

# Hits, or any dataclass with `chunk_id` and `score` (the embedded store fuses row-id candidates first).
Scored = TypeVar("Scored")


def _normalised(hits: list, key: Callable) -> dict[Hashable, float]:
    if not hits:
        return {}
    scores = [h.score for h in hits]
    low, high = min(scores), max(scores)
    if high == low:
        return {key(h): 1.0 for h in hits}
    return {key(h): (h.score - low) / (high - low) for h in hits}


def relative_score_fusion(vector_hits: list[Scored], keyword_hits: list[Scored], alpha: float, top_k: int,
                          key: Callable = attrgetter("chunk_id")) -> list[Scored]:
    """alpha * normalised vector score + (1 - alpha) * normalised keyword score; a chunk absent from a list
    gets 0 from it. Ties keep vector order first, then keyword order, like Weaviate. `key` names a chunk
    (the embedded store fuses by row id when both lists come from one version)."""
    vector_norm, keyword_norm = _normalised(vector_hits, key), _normalised(keyword_hits, key)
    by_id: dict[Hashable, Scored] = {}
    for hit in [*vector_hits, *keyword_hits]:
        by_id.setdefault(key(hit), hit)
    fused = [
        replace(hit, score=alpha * vector_norm.get(cid, 0.0) + (1 - alpha) * keyword_norm.get(cid, 0.0))
        for cid, hit in by_id.items()
    ]
    fused.sort(key=lambda h: h.score, reverse=True)  # stable: insertion order breaks ties
    return fused[:top_k]
