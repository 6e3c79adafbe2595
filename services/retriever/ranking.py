"""Hybrid ranking: Weaviate's relativeScoreFusion (min-max normalise each result list, weight by alpha, sum)."""

from __future__ import annotations

from dataclasses import replace
from typing import TypeVar

# Hits, or any dataclass with `chunk_id` and `score` (the embedded store fuses row-id candidates first).
Scored = TypeVar("Scored")


def _normalised(hits: list) -> dict[str, float]:
    if not hits:
        return {}
    scores = [h.score for h in hits]
    low, high = min(scores), max(scores)
    if high == low:
        return {h.chunk_id: 1.0 for h in hits}
    return {h.chunk_id: (h.score - low) / (high - low) for h in hits}


def relative_score_fusion(vector_hits: list[Scored], keyword_hits: list[Scored], alpha: float, top_k: int) -> list[Scored]:
    """alpha * normalised vector score + (1 - alpha) * normalised keyword score; a chunk absent from a list
    gets 0 from it. Ties keep vector order first, then keyword order, like Weaviate."""
    vector_norm, keyword_norm = _normalised(vector_hits), _normalised(keyword_hits)
    by_id: dict[str, Scored] = {}
    for hit in [*vector_hits, *keyword_hits]:
        by_id.setdefault(hit.chunk_id, hit)
    fused = [
        replace(hit, score=alpha * vector_norm.get(cid, 0.0) + (1 - alpha) * keyword_norm.get(cid, 0.0))
        for cid, hit in by_id.items()
    ]
    fused.sort(key=lambda h: h.score, reverse=True)  # stable: insertion order breaks ties
    return fused[:top_k]
