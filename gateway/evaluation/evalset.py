"""Parses an eval set (JSONL: question, reference answers, optional id and gold document ids) and
reports every problem in it, each with its line number, in one INVALID_ARGUMENT."""

from __future__ import annotations

import json
from typing import Any

from ragtune.errors import FieldViolation, InvalidArgument

from gateway.evaluation.results import EvalItem

FIELD = "eval_set"
# The violations travel back in the status trailers, which gRPC caps at a few KiB: past this many
# problems the rest are counted, not listed.
MAX_REPORTED_PROBLEMS = 20
_MAX_ECHO_CHARS = 60


def _echo(value: str) -> str:
    """A user value quoted in a message, cut short so one bad line cannot flood the report."""
    return json.dumps(value if len(value) <= _MAX_ECHO_CHARS else value[:_MAX_ECHO_CHARS] + "...")


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _string_list(record: dict, key: str, *, allow_single: bool) -> tuple[list[str], list[str]]:
    """The strings under `key` and the problems found; a single string is allowed where `allow_single`."""
    value = record[key]
    if isinstance(value, str) and allow_single:
        value = [value]
    if not isinstance(value, list):
        return [], [f'"{key}" must be a list of strings, got {_type_name(value)}']
    problems = []
    for index, entry in enumerate(value):
        if not isinstance(entry, str):
            problems.append(f'"{key}[{index}]" must be a string, got {_type_name(entry)}')
        elif not entry.strip():
            problems.append(f'"{key}[{index}]" is empty')
    return [entry.strip() for entry in value if isinstance(entry, str) and entry.strip()], problems


def _references(record: dict) -> tuple[list[str], list[str]]:
    if "answers" in record and "answer" in record:
        return [], ['give either "answers" or "answer", not both']
    key = "answers" if "answers" in record else "answer" if "answer" in record else None
    if key is None:
        return [], ['no reference answers: "answers" (a list of strings) or "answer" (a string) is required']
    references, problems = _string_list(record, key, allow_single=True)
    if not references and not problems:
        problems.append(f'no reference answers: "{key}" is empty')
    return references, problems


def _question(record: dict) -> tuple[str, list[str]]:
    if "question" not in record:
        return "", ['missing "question"']
    question = record["question"]
    if not isinstance(question, str):
        return "", [f'"question" must be a string, got {_type_name(question)}']
    if not question.strip():
        return "", ['"question" is empty']
    return question.strip(), []


def _item_id(record: dict, line: int) -> tuple[str, list[str]]:
    if record.get("id") is None:
        return f"q{line}", []
    value = record["id"]
    # Integer ids are common in exported data sets; booleans are ints to Python but not ids.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value), []
    if not isinstance(value, str):
        return "", [f'"id" must be a string, got {_type_name(value)}']
    if not value.strip():
        return "", ['"id" is empty']
    return value.strip(), []


def _gold_ids(record: dict) -> tuple[list[str], list[str]]:
    if record.get("gold_document_ids") is None:
        return [], []
    return _string_list(record, "gold_document_ids", allow_single=False)


def _parse_line(raw: str, line: int) -> tuple[EvalItem | None, list[str]]:
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as error:
        return None, [f"not valid JSON ({error.msg} at column {error.colno})"]
    if not isinstance(record, dict):
        return None, [f"expected a JSON object, got {_type_name(record)}"]
    question, problems = _question(record)
    references, more = _references(record)
    item_id, id_problems = _item_id(record, line)
    gold, gold_problems = _gold_ids(record)
    problems += more + id_problems + gold_problems
    if problems:
        return None, problems
    return EvalItem(id=item_id, question=question, references=references, gold_document_ids=gold), []


def _decode(text: str | bytes) -> str:
    if isinstance(text, str):
        return text
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError as error:
        line = text.count(b"\n", 0, error.start) + 1
        raise InvalidArgument(FIELD, f"line {line}: not UTF-8 text (byte {error.start})") from None


def parse_eval_set(text: str | bytes, *, max_items: int = 1000) -> list[EvalItem]:
    """The items of a JSONL eval set, or InvalidArgument listing every problem as "line N: ..."."""
    if max_items < 1:
        raise ValueError("max_items must be >= 1")
    items: list[EvalItem] = []
    problems: list[tuple[int, str]] = []
    first_line_of: dict[str, int] = {}
    count = 0
    over_limit_line = 0
    for line, raw in enumerate(_decode(text).removeprefix("\ufeff").split("\n"), start=1):
        if not raw.strip():
            continue
        count += 1
        if count > max_items:
            over_limit_line = over_limit_line or line
            continue
        item, found = _parse_line(raw, line)
        problems += [(line, problem) for problem in found]
        if item is None:
            continue
        if item.id in first_line_of:
            problems.append((line, f"id {_echo(item.id)} is already used on line {first_line_of[item.id]}"))
            continue
        first_line_of[item.id] = line
        items.append(item)
    if over_limit_line:
        problems.append((over_limit_line, f"too many items: {count} in the file, at most {max_items} allowed"))
    if count == 0:
        problems.append((1, "the eval set is empty: expected one JSON object per line"))
    if problems:
        raise InvalidArgument.of(_violations(problems))
    return items


def _violations(problems: list[tuple[int, str]]) -> list[FieldViolation]:
    listed = [FieldViolation(FIELD, f"line {line}: {problem}") for line, problem in problems[:MAX_REPORTED_PROBLEMS]]
    if len(problems) > MAX_REPORTED_PROBLEMS:
        rest = problems[MAX_REPORTED_PROBLEMS:]
        listed.append(
            FieldViolation(FIELD, f"line {rest[0][0]}: and {len(rest)} more problems from this line on")
        )
    return listed
