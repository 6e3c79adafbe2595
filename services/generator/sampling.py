"""Validates a SamplingRequest into an engine `Sampling`, naming each bad field."""

from __future__ import annotations

import json
import math
import re

from ragtune.errors import FieldViolation
from services.generator.domain import SamplingRequest, StructuredOutput
from services.generator.domain import Sampling

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_TOP_LOGPROBS = 20  # vLLM's default max_logprobs
MAX_JSON_SCHEMA_CHARS = 65_536
MAX_REGEX_CHARS = 4_096
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 1_024
GREEDY_BELOW = 1e-5  # vLLM decodes greedily below this temperature, and then allows only n = 1


def parse_sampling(
    request: SamplingRequest, *, default_temperature: float, max_n: int = 8, field: str = "sampling"
) -> tuple[Sampling, list[FieldViolation]]:
    """Returns the parameters with defaults filled in (max_tokens stays 0 when unset: it depends on
    the prompt length) and every violation found, so a client sees all its mistakes at once."""
    bad: list[FieldViolation] = []

    temperature = request.temperature if request.temperature is not None else default_temperature
    if not math.isfinite(temperature) or not 0.0 <= temperature <= 2.0:
        bad.append(FieldViolation(f"{field}.temperature", f"must be a finite number in [0, 2], got {temperature}"))

    top_p = request.top_p if request.top_p is not None else 1.0
    if not math.isfinite(top_p) or not 0.0 < top_p <= 1.0:
        bad.append(FieldViolation(f"{field}.top_p", f"must be in (0, 1], got {top_p}"))

    top_k = request.top_k if request.top_k is not None else 0
    if top_k < 0:
        bad.append(FieldViolation(f"{field}.top_k", f"must be 0 (no cut) or positive, got {top_k}"))

    max_tokens = 0
    if request.max_tokens is not None:
        max_tokens = request.max_tokens
        if max_tokens < 1:
            bad.append(FieldViolation(f"{field}.max_tokens", f"must be at least 1, got {max_tokens}"))

    stop = tuple(request.stop)
    if len(stop) > MAX_STOP_STRINGS:
        bad.append(FieldViolation(f"{field}.stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}"))
    for i, s in enumerate(stop):
        if not s or len(s) > MAX_STOP_LENGTH:
            bad.append(FieldViolation(f"{field}.stop[{i}]", f"must be 1 to {MAX_STOP_LENGTH} characters"))

    penalty = request.repetition_penalty if request.repetition_penalty is not None else 1.0
    if not math.isfinite(penalty) or penalty <= 0.0:
        bad.append(FieldViolation(f"{field}.repetition_penalty", f"must be a finite number > 0, got {penalty}"))

    n = request.n if request.n is not None else 1
    if not 1 <= n <= max_n:
        bad.append(FieldViolation(f"{field}.n", f"must be 1 to {max_n} (RAGTUNE_GENERATOR_MAX_N), got {n}"))
    elif n > 1 and math.isfinite(temperature) and temperature < GREEDY_BELOW:
        bad.append(
            FieldViolation(f"{field}.n", f"more than 1 completion needs temperature > 0 (greedy decoding gives one"
                           f" answer), got n = {n} with temperature {temperature}")
        )

    logprobs = None
    top_logprobs = request.top_logprobs if request.top_logprobs is not None else 0
    if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        bad.append(FieldViolation(f"{field}.top_logprobs", f"must be 0 to {MAX_TOP_LOGPROBS}, got {top_logprobs}"))
    elif request.top_logprobs and not request.logprobs:
        bad.append(FieldViolation(f"{field}.top_logprobs", "needs logprobs set to true"))
    elif request.logprobs:
        logprobs = top_logprobs

    presence = _penalty(request.presence_penalty, f"{field}.presence_penalty", bad)
    frequency = _penalty(request.frequency_penalty, f"{field}.frequency_penalty", bad)

    if request.structured_output is not None:
        bad.extend(check_structured_output(request.structured_output, f"{field}.structured_output"))

    sampling = Sampling(
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=int(top_k),
        max_tokens=int(max_tokens),
        stop=stop,
        seed=request.seed,
        repetition_penalty=float(penalty),
        n=int(n),
        logprobs=logprobs,
        presence_penalty=presence,
        frequency_penalty=frequency,
        structured_output=request.structured_output,
    )
    return sampling, bad


def _penalty(value: float | None, name: str, bad: list[FieldViolation]) -> float:
    value = 0.0 if value is None else float(value)
    if not math.isfinite(value) or not -2.0 <= value <= 2.0:
        bad.append(FieldViolation(name, f"must be a finite number in [-2, 2], got {value}"))
    return value


def check_structured_output(constraint: StructuredOutput, field: str) -> list[FieldViolation]:
    """Violations of a structured-output constraint found without the engine (vLLM's own grammar compiler
    checks again when the request reaches it, and what it refuses is reported on the same field)."""
    kinds = constraint.kinds()
    if len(kinds) != 1:
        return [
            FieldViolation(field, f"set exactly one of json_schema, regex, choice or json_object; got {len(kinds)}")
        ]
    kind = kinds[0]
    name = f"{field}.{kind}"
    if kind == "json_schema":
        return [FieldViolation(name, reason)] if (reason := _schema_problem(constraint.json_schema)) else []
    if kind == "regex":
        pattern = constraint.regex
        if not pattern or len(pattern) > MAX_REGEX_CHARS:
            return [FieldViolation(name, f"must be 1 to {MAX_REGEX_CHARS} characters")]
        if "\x00" in pattern:
            return [FieldViolation(name, "must not contain a NUL character")]
        try:
            re.compile(pattern)
        except (re.error, RecursionError, OverflowError) as exc:
            return [FieldViolation(name, f"is not a valid regular expression: {exc}")]
        return []
    if kind == "choice":
        choices = constraint.choice
        if not choices:
            return [FieldViolation(f"{name}.choices", "at least one choice is required")]
        if len(choices) > MAX_CHOICES:
            return [FieldViolation(f"{name}.choices", f"at most {MAX_CHOICES} choices, got {len(choices)}")]
        return [
            FieldViolation(f"{name}.choices[{i}]", f"must be 1 to {MAX_CHOICE_CHARS} characters")
            for i, choice in enumerate(choices)
            if not choice or len(choice) > MAX_CHOICE_CHARS
        ]
    if constraint.json_object is not True:
        return [FieldViolation(name, "must be true when set (leave structured_output unset for free text)")]
    return []


def _schema_problem(text: str) -> str | None:
    if not text or len(text) > MAX_JSON_SCHEMA_CHARS:
        return f"must be 1 to {MAX_JSON_SCHEMA_CHARS} characters of JSON"
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return f"is not valid JSON: {exc}"
    if not isinstance(schema, dict):
        return f"must be a JSON object (a JSON schema), got {type(schema).__name__}"
    try:
        import jsonschema
    except ImportError:  # the JSON-object check above is all we can do without it
        return None
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        return f"is not a valid JSON schema: {exc.message} (at {exc.json_path})"
    except RecursionError:
        return "is nested too deeply"
    return None
