"""Checks an uploaded JSONL dataset line by line before training: the format, every problem with its
line, duplicates, and each example's length once rendered; normalizes records into message lists."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMATS = ("chat", "prompt_completion", "instruction", "preference")
ROLES = ("system", "user", "assistant")
# A report listing a million broken lines helps nobody and would not fit in one message.
MAX_PROBLEMS = 1000


@dataclass(frozen=True)
class Problem:
    line: int  # 1-based; 0 for the whole dataset
    field: str
    message: str


@dataclass
class ValidationReport:
    format: str | None
    examples: list[dict[str, Any]] = field(default_factory=list)  # normalized, see _normalize
    problems: list[Problem] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.problems


def detect_format(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "chat"
    if "chosen" in record or "rejected" in record:
        return "preference"
    if "instruction" in record or "output" in record:
        return "instruction"
    if "prompt" in record or "completion" in record:
        return "prompt_completion"
    return None


_REQUIRED = {
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "instruction": ("instruction", "output"),
    "preference": ("prompt", "chosen", "rejected"),
}


def _text_fields(record: dict, names, line: int, problems: list[Problem]) -> bool:
    ok = True
    for name in names:
        if name not in record:
            problems.append(Problem(line, name, f"missing field {name!r}"))
            ok = False
        elif not isinstance(record[name], str):
            problems.append(Problem(line, name, f"{name!r} must be a string"))
            ok = False
        elif not record[name].strip():
            problems.append(Problem(line, name, f"{name!r} is empty"))
            ok = False
    return ok


def _chat_messages(record: dict, line: int, problems: list[Problem]) -> list[dict] | None:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        problems.append(Problem(line, "messages", "'messages' must be a non-empty list"))
        return None
    ok = True
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            problems.append(Problem(line, where, "must be an object with 'role' and 'content'"))
            ok = False
            continue
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            problems.append(Problem(line, f"{where}.role", f"unknown role {role!r}; one of {', '.join(ROLES)}"))
            ok = False
        if not isinstance(content, str) or not content.strip():
            problems.append(Problem(line, f"{where}.content", "missing or empty content"))
            ok = False
    if ok and messages[-1]["role"] != "assistant":
        problems.append(Problem(line, "messages", "the last message must be the assistant's answer"))
        ok = False
    return [{"role": m["role"], "content": m["content"]} for m in messages] if ok else None


def _normalize(fmt: str, record: dict, line: int, problems: list[Problem]) -> dict | None:
    """Turns one record into {"messages": [...]} (supervised) or {"prompt", "chosen", "rejected"}
    as message lists (preference), or reports why it cannot."""
    if fmt == "chat":
        messages = _chat_messages(record, line, problems)
        return {"messages": messages} if messages else None
    if not _text_fields(record, _REQUIRED[fmt], line, problems):
        return None
    if fmt == "prompt_completion":
        return {
            "messages": [
                {"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["completion"]},
            ]
        }
    if fmt == "instruction":
        extra = record.get("input", "")
        if not isinstance(extra, str):
            problems.append(Problem(line, "input", "'input' must be a string"))
            return None
        prompt = record["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]}
    if record["chosen"] == record["rejected"]:
        problems.append(Problem(line, "rejected", "'chosen' and 'rejected' are the same"))
        return None
    return {
        "prompt": [{"role": "user", "content": record["prompt"]}],
        "chosen": [{"role": "assistant", "content": record["chosen"]}],
        "rejected": [{"role": "assistant", "content": record["rejected"]}],
    }


class DatasetValidator:
    """Checks a JSONL file and reports every problem with its line; `count_tokens` measures a
    normalized example as the model will see it, for the max_seq_len check."""

    def __init__(self, count_tokens: Callable[[dict], int], min_examples: int):
        self._count_tokens = count_tokens
        self._min_examples = min_examples

    def validate(self, path: Path, *, fmt: str | None = None, max_seq_len: int = 256) -> ValidationReport:
        report = ValidationReport(format=fmt)
        problems = report.problems
        seen: dict[str, int] = {}
        with open(path, "rb") as handle:
            for line_no, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue  # blank lines (a trailing newline, spacing) carry nothing
                try:
                    record = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    problems.append(Problem(line_no, "", "not UTF-8 text"))
                    continue
                except json.JSONDecodeError as exc:
                    problems.append(Problem(line_no, "", f"bad JSON: {exc.msg} at column {exc.colno}"))
                    continue
                if not isinstance(record, dict):
                    problems.append(Problem(line_no, "", "each line must be a JSON object"))
                    continue
                if report.format is None:
                    report.format = detect_format(record)
                    if report.format is None:
                        problems.append(Problem(line_no, "", f"unrecognized record with keys {sorted(record)}"))
                        continue
                example = _normalize(report.format, record, line_no, problems)
                if example is None:
                    continue
                key = json.dumps(example, sort_keys=True)
                if key in seen:
                    problems.append(Problem(line_no, "", f"duplicate of line {seen[key]}"))
                    continue
                seen[key] = line_no
                tokens = self._count_tokens(example)
                if tokens > max_seq_len:
                    problems.append(
                        Problem(line_no, "", f"{tokens} tokens once rendered, more than max_seq_len {max_seq_len}")
                    )
                    continue
                report.examples.append(example)
        if report.format is None:
            problems.append(
                Problem(0, "format", "no line in a known format (chat, prompt/completion, instruction, preference)")
            )
        if len(report.examples) < self._min_examples:
            problems.append(
                Problem(0, "", f"{len(report.examples)} valid examples; at least {self._min_examples} are needed")
            )
        if len(problems) > MAX_PROBLEMS:
            dropped = len(problems) - MAX_PROBLEMS
            del problems[MAX_PROBLEMS:]
            problems.append(Problem(0, "", f"and {dropped} more problems"))
        return report
