"""Turns a GenerationInput (chat messages or a raw prompt) into prompt token ids, naming bad fields."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ragtune.errors import FieldViolation
from services.generator.domain import GenerationInput

CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class RenderedPrompt:
    token_ids: list[int]
    field: str  # the request field the prompt came from, named when it does not fit the context


class PromptRenderer:
    """Renders chat with the model's own chat template and tokenizes, as the engine will see it."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    @classmethod
    def load(cls, model_dir: Path) -> "PromptRenderer":
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(model_dir)))

    def check(self, message: GenerationInput, field: str = "input") -> list[FieldViolation]:
        """Violations of the input's shape (cheap; no tokenization)."""
        if (message.prompt is None) == (message.chat is None):
            return [FieldViolation(field, "set either chat or prompt")]
        if message.prompt is not None:
            return [] if message.prompt else [FieldViolation(f"{field}.prompt", "must not be empty")]
        messages = message.chat
        if not messages:
            return [FieldViolation(f"{field}.chat.messages", "at least one message is required")]
        bad = []
        for i, m in enumerate(messages):
            if m.role not in CHAT_ROLES:
                bad.append(
                    FieldViolation(
                        f"{field}.chat.messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}; got {m.role!r}"
                    )
                )
        return bad

    def render(self, message: GenerationInput, field: str = "input") -> RenderedPrompt:
        """Token ids of a checked input (blocking: call it off the event loop)."""
        if message.prompt is not None:
            return RenderedPrompt(self._tokenizer.encode(message.prompt), f"{field}.prompt")
        conversation = [{"role": m.role, "content": m.content} for m in message.chat]
        text = self._tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        # The template already writes the special tokens; adding them again would double the BOS.
        return RenderedPrompt(self._tokenizer.encode(text, add_special_tokens=False), f"{field}.chat.messages")
