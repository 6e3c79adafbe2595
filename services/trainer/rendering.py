"""Renders examples with the base model's chat template into token ids and labels, with labels
-100 on everything but the assistant's answers so the loss is only on what the model should say."""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]


class ChatRenderer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def _text(self, messages: list[dict], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def supervised(self, messages: list[dict]) -> TokenizedExample:
        text = self._text(messages)
        # Character spans of each assistant answer: from the end of the generation prompt that
        # precedes it to the end of the conversation rendered through it (its end-of-turn included).
        spans = []
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                start = len(self._text(messages[:i], generation_prompt=True))
                end = len(self._text(messages[: i + 1]))
                if not text.startswith(self._text(messages[: i + 1])):
                    raise ValueError("the chat template does not render conversations prefix by prefix")
                spans.append((start, end))
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        labels = [
            token if any(s <= offset[0] < e for s, e in spans) else IGNORE_INDEX
            for token, offset in zip(encoded["input_ids"], encoded["offset_mapping"])
        ]
        return TokenizedExample(list(encoded["input_ids"]), labels)

    def token_count(self, example: dict) -> int:
        """Tokens of a normalized example as trained: the conversation, or for a preference pair
        the prompt with the longer of its two answers."""
        if "messages" in example:
            return len(self.tokenizer(self._text(example["messages"]), add_special_tokens=False)["input_ids"])
        return max(
            len(self.tokenizer(self._text(example["prompt"] + example[side]), add_special_tokens=False)["input_ids"])
            for side in ("chosen", "rejected")
        )
