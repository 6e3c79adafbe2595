"""Splits text into overlapping chunks of at most N tokens, breaking at paragraph, then sentence, then word boundaries."""

from __future__ import annotations

import re
from dataclasses import dataclass

# A token starts a sentence when the gap before it follows sentence-ending punctuation.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")
_PARAGRAPH_GAP = re.compile(r"\n\s*\n")

_WORD, _SENTENCE, _PARAGRAPH = 1, 2, 3


@dataclass(frozen=True)
class TextChunk:
    index: int
    text: str
    start_token: int
    end_token: int  # exclusive
    # The chunk's tokens from the one tokenizer pass over the document (no special tokens), so the
    # embedder need not tokenize the chunk text again.
    token_ids: tuple[int, ...] = ()


class Chunker:
    """Token-based chunking with the embedding model's own tokenizer, so chunk sizes match what it embeds."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def _encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoded = self._tokenizer(
            text, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False, verbose=False
        )
        return encoded["input_ids"], [tuple(o) for o in encoded["offset_mapping"]]

    def split(self, text: str, chunk_tokens: int, overlap_tokens: int) -> list[TextChunk]:
        if chunk_tokens < 1 or not 0 <= overlap_tokens < chunk_tokens:
            raise ValueError("need chunk_tokens >= 1 and 0 <= overlap_tokens < chunk_tokens")
        ids, offsets = self._encode(text)
        if not offsets:
            return []
        strength = _boundary_strengths(text, offsets)
        n = len(offsets)
        chunks: list[TextChunk] = []
        start = 0
        while True:
            limit = start + chunk_tokens
            end = n if limit >= n else _best_break(strength, start + max(1, chunk_tokens // 2), limit)
            chunks.append(
                TextChunk(len(chunks), text[offsets[start][0] : offsets[end - 1][1]], start, end, tuple(ids[start:end]))
            )
            if end >= n:
                return chunks
            start = _overlap_start(strength, end, overlap_tokens, start)


def _boundary_strengths(text: str, offsets: list[tuple[int, int]]) -> list[int]:
    """strength[i]: how good a place the start of token i is to begin a chunk (0 = inside a word)."""
    strength = [_PARAGRAPH] + [0] * (len(offsets) - 1)
    for i in range(1, len(offsets)):
        gap = text[offsets[i - 1][1] : offsets[i][0]]
        if not gap:
            continue  # word pieces of one word, or punctuation attached to it
        if _PARAGRAPH_GAP.search(gap):
            strength[i] = _PARAGRAPH
        elif _SENTENCE_END.search(text[offsets[i - 1][0] : offsets[i - 1][1]]):
            strength[i] = _SENTENCE
        else:
            strength[i] = _WORD
    return strength


def _best_break(strength: list[int], lowest: int, limit: int) -> int:
    """The end (exclusive) of a chunk: the strongest boundary in [lowest, limit], latest among equals."""
    best, best_strength = limit, 0
    for i in range(limit, lowest - 1, -1):
        if strength[i] > best_strength:
            best, best_strength = i, strength[i]
            if best_strength == _PARAGRAPH:
                break
    return best


def _overlap_start(strength: list[int], end: int, overlap: int, previous_start: int) -> int:
    """Where the next chunk starts: at most `overlap` tokens before `end`, at the strongest boundary there
    (the earliest among equals, keeping as much context as allowed)."""
    earliest = max(end - overlap, previous_start + 1)
    if earliest >= end:
        return end
    best = earliest
    for i in range(earliest, end):
        if strength[i] > strength[best]:
            best = i
    return best
