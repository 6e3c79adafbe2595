"""Text evidence for answers: sentences, comparable terms and their weights (plain Python, no model).

The gateway uses these to keep only the sentences of a passage that bear on the question, to tell
when nothing retrieved does, and to find which passage holds an answer's facts. Terms are
lower-cased, lightly stemmed words and numbers, so "stores"/"stored"/"store" and "1,204"/"1204" meet.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Iterable, Sequence

_TOKEN = re.compile(r"[A-Za-z0-9]+(?:[.,'’][A-Za-z0-9]+)*")
# A sentence ends at . ! or ? (before closing quotes or brackets) followed by space and a capital or
# digit, or at a line break. Abbreviations and initials are joined back below.
_BOUNDARY = re.compile(r"(?<=[.!?])[\"'’)\]]*\s+(?=[\"'‘(\[]?[A-Z0-9])|\s*\n\s*")
_ABBREVIATION = re.compile(r"(?:\b(?:Dr|Mr|Mrs|Ms|Prof|St|Sr|Jr|Mt|No|vs|etc|ca|c|e\.g|i\.e|[A-Z])\.)$")
STOPWORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before being below
    between both but by can could did do does doing done down during each either else ever every few for from
    further had has have having he her here hers herself him himself his how however i if in into is it its
    itself just least less like many may me might more most much must my myself no nor not now of off often
    on once one only or other others our ours ourselves out over own per quite rather same shall she should
    since so some such than that the their theirs them themselves then there these they this those though
    through thus to too under until up upon us very was we were what whatever when where whether which while
    who whom whose why will with within without would yet you your yours yourself yourselves
    say says said tell kind type""".split()
)
_PRONOUN_START = frozenset("it its this these they their he she his her him them that such there".split())


def sentences(text: str) -> list[str]:
    """The text's sentences in order (line breaks end a sentence; "Dr. Reyes" and "J. Smith" stay whole)."""
    pieces: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(text):
        end = match.start()
        # Only the last few characters can hold an abbreviation: test them, not the whole piece.
        if "\n" not in match.group(0) and _ABBREVIATION.search(text[max(start, end - 6):end]):
            continue
        piece = text[start:end].strip()
        if piece:
            pieces.append(piece)
        start = match.end()
    tail = text[start:].strip()
    if tail:
        pieces.append(tail)
    return pieces


def first_sentence_end(text: str, start: int = 0, min_words: int = 3) -> int | None:
    """Where the first sentence of `text` that ends at or after `start` ends (just after its full stop),
    or None while it has not ended (the next sentence's first letter must be seen to tell "Dr. Reyes"
    and "3.2" from an end). Fewer than `min_words` words ("Ahoy!", "Yes.") do not make a sentence."""
    for match in _BOUNDARY.finditer(text, max(0, start - 2)):
        end = match.start()
        if len(text[:end].split()) < min_words:
            continue
        if "\n" in match.group(0) or not _ABBREVIATION.search(text[max(0, end - 6):end]):
            return end
    return None


@lru_cache(maxsize=1 << 16)
def stem(word: str) -> str:
    """A deliberately small stemmer: plural and verb endings, then a final e ("stored" -> "stor")."""
    if word[0].isdigit():
        return word.replace(",", "").rstrip(".")
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    for suffix in ("ing", "ed", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3 and not word.endswith("ss"):
            word = word[: -len(suffix)]
            break
    return word[:-1] if word.endswith("e") and len(word) > 3 else word


@lru_cache(maxsize=1 << 16)
def _term(token: str) -> str | None:
    """A token's term, or None for a stop word (cached: text repeats words, and requests repeat text)."""
    word = token.lower().replace("’", "'")
    if word.endswith("'s"):
        word = word[:-2]
    word = word.replace("'", "")
    if not word or word in STOPWORDS or (len(word) == 1 and not word.isdigit()):
        return None
    return stem(word)


def terms(text: str) -> list[str]:
    """Content terms in order: stop words dropped, possessives cut, stemmed."""
    return [t for t in map(_term, _TOKEN.findall(text)) if t is not None]


@lru_cache(maxsize=4096)
def analysed(text: str) -> tuple[tuple[str, frozenset[str]], ...]:
    """(sentence, its term set) for each sentence of a text; cached, since the same chunks come back
    for related questions."""
    return tuple((s, frozenset(terms(s))) for s in sentences(text) or [text])


def key_terms(question: str) -> tuple[set[str], set[str]]:
    """(names, numbers) of a question: capitalised words after its first word, and digits. A passage
    that mentions none of a question's names is not about what it asks."""
    names, numbers = set(), set()
    for i, token in enumerate(_TOKEN.findall(question)):
        if token[0].isdigit():
            numbers.add(stem(token))
        elif i > 0 and token[0].isupper():
            names.update(terms(token))
    return names, numbers


def idf(units: Iterable[frozenset[str]], wanted: Iterable[str]) -> dict[str, float]:
    """Inverse document frequency over `units` (sentences) of the `wanted` terms that occur in them:
    rare terms identify more. Only the terms asked for are counted (the gateway needs a handful)."""
    units = list(units)
    n = len(units)
    weights = {}
    for term in set(wanted):
        df = sum(1 for unit in units if term in unit)
        if df:
            weights[term] = math.log(1 + n / df)
    return weights


def rarest(n_units: int) -> float:
    """The weight of a term found in one unit of n: the most any term can weigh."""
    return math.log(1 + max(1, n_units))


def weight(found: Iterable[str], weights: dict[str, float], default: float) -> float:
    return sum(weights.get(t, default) for t in found)


def starts_with_reference(sentence: str) -> bool:
    """Whether a sentence leans on the one before it ("It was invented ...", "Its capital ...")."""
    first = _TOKEN.match(sentence.lstrip("\"'‘(["))
    return bool(first) and first.group(0).lower() in _PRONOUN_START


def best_window(words: Sequence[str], wanted: set[str], size: int) -> tuple[int, int]:
    """The [start, end) of the `size`-word window of `words` holding the most wanted terms."""
    if len(words) <= size:
        return 0, len(words)
    hits = [1 if _term_of_word(w) in wanted else 0 for w in words]
    best, best_start, current = -1, 0, sum(hits[:size])
    for start in range(0, len(words) - size + 1):
        if start:
            current += hits[start + size - 1] - hits[start - 1]
        if current > best:
            best, best_start = current, start
    return best_start, best_start + size


def _term_of_word(word: str) -> str | None:
    found = _TOKEN.search(word)
    return _term(found.group(0)) if found else None
