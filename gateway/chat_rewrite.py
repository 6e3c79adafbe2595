"""The standalone search query of a multi-turn chat: the prompt that asks the model to rewrite the last
user message so it makes sense without the conversation, the checks its rewrite must pass, and the
deterministic fallback when it does not (plain Python, no gRPC).

The base model here has 135M parameters: with a few-shot raw prompt (a chat-template prompt did far
worse, measured) it resolves "Where is it held?" to "Where is the Zorblax festival held?", but it
also writes "What is the capital of Bulgaria?" for "What is its capital?" after a turn about
Velmora, or returns the question unchanged. So a rewrite is used only when every name and number in
it comes from the conversation, most of its words do too, and, where the last message names nothing,
it names something from the earlier turns. Otherwise the query is the last message with the names of
the latest earlier user turn that has any appended in parentheses ("What is its capital? (Velmora)"),
which is what hybrid retrieval and passage selection key on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from gateway.evidence import STOPWORDS, key_terms, terms

# Stop the rewrite at its first line; a rewrite that runs to max_tokens is not a question.
REWRITE_MAX_TOKENS = 48
REWRITE_STOP = ("\n",)
# The conversation the rewrite sees: its latest messages, each cut to this many characters.
_TRANSCRIPT_MESSAGES = 6
_TRANSCRIPT_CHARS = 300
# Share of a rewrite's content terms that must occur in the conversation.
_MIN_GROUNDED = 0.75

_INSTRUCTION = (
    "Rewrite the last question so that it can be understood without the conversation: replace words like "
    '"it", "its", "she" or "there" with the name they refer to.\n\n'
)
_EXAMPLES = (
    ("Tell me about the Eiffel Tower.", "The Eiffel Tower is an iron tower in Paris.", "How tall is it?",
     "How tall is the Eiffel Tower?"),
    ("Who wrote Pride and Prejudice?", "Jane Austen wrote it.", "When was she born?", "When was Jane Austen born?"),
    ("What is the largest lake in Africa?", "Lake Victoria.", "Which countries border it?",
     "Which countries border Lake Victoria?"),
    ("Tell me about the Tour de France.", "It is a long bicycle race held in July.", "How long is the race?",
     "How long is the Tour de France race?"),
)
_ANSWER_LABEL = "Standalone question:"
_NAME = re.compile(r"[A-Za-z0-9]+(?:['’.-][A-Za-z0-9]+)*")

MODEL, FALLBACK, AS_WRITTEN = "model", "fallback", "as_written"


@dataclass(frozen=True)
class SearchQuery:
    """What retrieval searches with, and where it came from (MODEL: the model's rewrite; FALLBACK: the
    last message with the earlier turn's names; AS_WRITTEN: the last message, no rewrite asked)."""

    text: str
    source: str


def _line(role: str, content: str) -> str:
    text = " ".join(content.split())
    if len(text) > _TRANSCRIPT_CHARS:
        text = text[:_TRANSCRIPT_CHARS].rsplit(" ", 1)[0] + " ..."
    return f"{'User' if role == 'user' else 'Assistant'}: {text}"


def rewrite_prompt(turns: Sequence[tuple[str, str]]) -> str:
    """A raw (no chat template) few-shot prompt for the rewrite of the last of `turns` ((role, content),
    user and assistant only, the last from the user); the model completes the final line."""
    shots = "".join(
        f"Conversation:\nUser: {u}\nAssistant: {a}\nUser: {q}\n{_ANSWER_LABEL} {s}\n\n" for u, a, q, s in _EXAMPLES
    )
    transcript = "\n".join(_line(role, content) for role, content in turns[-_TRANSCRIPT_MESSAGES:])
    return f"{_INSTRUCTION}{shots}Conversation:\n{transcript}\n{_ANSWER_LABEL}"


def _clean(text: str) -> str:
    line = text.strip().split("\n", 1)[0].strip()
    if line.startswith(_ANSWER_LABEL):
        line = line[len(_ANSWER_LABEL):].strip()
    return line.strip("\"'“”‘’` ").strip()


def name_words(text: str) -> list[str]:
    """The capitalised words of a text after its first word, as written, in order, once each: the names
    a question mentions ("Tell me about Ada Kettering." -> ["Ada", "Kettering"])."""
    found: list[str] = []
    for i, word in enumerate(_NAME.findall(text)):
        if i and word[0].isupper() and word.lower() not in STOPWORDS and word not in found:
            found.append(word)
    return found


def fallback_query(turns: Sequence[tuple[str, str]]) -> str:
    """The last message, with the names of the latest earlier user turn that has any (else of the latest
    assistant turn that has any) appended in parentheses; the message alone if it names things itself
    or the conversation names nothing."""
    last = turns[-1][1].strip()
    if key_terms(last)[0]:
        return last
    earlier = list(reversed(turns[:-1]))
    for wanted in ("user", "assistant"):
        for role, content in earlier:
            names = name_words(content) if role == wanted else []
            if names:
                return f"{last} ({' '.join(names)})"
    return last


def judge_rewrite(turns: Sequence[tuple[str, str]], rewrite: str, finished: bool) -> SearchQuery:
    """The model's rewrite if it passes the checks (see the module docstring), else the fallback.
    `finished`: the rewrite ended by itself (a stop), not at its token limit."""
    last = turns[-1][1].strip()
    text = _clean(rewrite)
    if not finished or not text or len(text) > 2 * len(last) + 120:
        return SearchQuery(fallback_query(turns), FALLBACK)
    conversation = set(terms(" ".join(content for _, content in turns)))
    earlier = set(terms(" ".join(content for _, content in turns[:-1])))
    names, numbers = key_terms(text)
    if (names | numbers) - conversation:
        return SearchQuery(fallback_query(turns), FALLBACK)  # invented ("the capital of Bulgaria")
    found = terms(text)
    if found and sum(t in conversation for t in found) < _MIN_GROUNDED * len(found):
        return SearchQuery(fallback_query(turns), FALLBACK)
    if not key_terms(last)[0] and not names & earlier:
        return SearchQuery(fallback_query(turns), FALLBACK)  # still leans on the conversation ("When was it founded?")
    return SearchQuery(text, MODEL)
