"""The generator core's request and result types: plain dataclasses, no protobuf (convert.py maps them)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str


@dataclass(frozen=True)
class GenerationInput:
    """What to complete: exactly one of `prompt` (raw text) and `chat` (turns, oldest first) is set;
    neither set is a request mistake the core reports."""

    prompt: str | None = None
    chat: tuple[ChatTurn, ...] | None = None


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the output: exactly one of the four is set (the core reports anything else)."""

    json_schema: str | None = None  # JSON text of a schema
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    json_object: bool | None = None

    def kinds(self) -> list[str]:
        """The kinds set, by field name."""
        return [name for name in ("json_schema", "regex", "choice", "json_object") if getattr(self, name) is not None]


@dataclass(frozen=True)
class SamplingRequest:
    """Sampling parameters as the client sent them: None (or empty) where unset, so the core fills in its
    documented defaults (see sampling.py)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    repetition_penalty: float | None = None
    n: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    structured_output: StructuredOutput | None = None


@dataclass(frozen=True)
class TopLogprob:
    token: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its text, its log probability, and the most likely tokens at its position."""

    token: str
    logprob: float
    top_logprobs: tuple[TopLogprob, ...] = ()


@dataclass
class ChoiceResult:
    """One whole completion of a request (unary Generate)."""

    index: int
    text: str = ""
    finish_reason: str | None = None  # "stop", "length", "abort"; None if it never finished
    tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class Sampling:
    """Validated sampling parameters (see sampling.py for the defaults and bounds)."""

    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    stop: tuple[str, ...]
    seed: int | None
    repetition_penalty: float
    n: int = 1
    logprobs: int | None = None  # None: none; k: each token's own log probability and the k most likely
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    structured_output: StructuredOutput | None = None


@dataclass(frozen=True)
class Chunk:
    """Text and token count generated for the choice `index` since its previous chunk; finish_reason set
    on that choice's last one; the log probabilities of those tokens where the request asked for them."""

    text: str
    tokens: int
    finish_reason: str | None  # "stop", "length", "abort" or None while running
    index: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()
