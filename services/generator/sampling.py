"""Validates the SamplingParams message into an engine `Sampling`, naming each bad field."""

from __future__ import annotations

import math

from ragtune.errors import FieldViolation
from ragtune.v1 import common_pb2
from services.generator.engine import Sampling

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256


def parse_sampling(
    message: common_pb2.SamplingParams, *, default_temperature: float, field: str = "sampling"
) -> tuple[Sampling, list[FieldViolation]]:
    """Returns the parameters with defaults filled in (max_tokens stays 0 when unset: it depends on
    the prompt length) and every violation found, so a client sees all its mistakes at once."""
    bad: list[FieldViolation] = []

    temperature = message.temperature if message.HasField("temperature") else default_temperature
    if not math.isfinite(temperature) or not 0.0 <= temperature <= 2.0:
        bad.append(FieldViolation(f"{field}.temperature", f"must be a finite number in [0, 2], got {temperature}"))

    top_p = message.top_p if message.HasField("top_p") else 1.0
    if not math.isfinite(top_p) or not 0.0 < top_p <= 1.0:
        bad.append(FieldViolation(f"{field}.top_p", f"must be in (0, 1], got {top_p}"))

    top_k = message.top_k if message.HasField("top_k") else 0
    if top_k < 0:
        bad.append(FieldViolation(f"{field}.top_k", f"must be 0 (no cut) or positive, got {top_k}"))

    max_tokens = 0
    if message.HasField("max_tokens"):
        max_tokens = message.max_tokens
        if max_tokens < 1:
            bad.append(FieldViolation(f"{field}.max_tokens", f"must be at least 1, got {max_tokens}"))

    stop = tuple(message.stop)
    if len(stop) > MAX_STOP_STRINGS:
        bad.append(FieldViolation(f"{field}.stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}"))
    for i, s in enumerate(stop):
        if not s or len(s) > MAX_STOP_LENGTH:
            bad.append(FieldViolation(f"{field}.stop[{i}]", f"must be 1 to {MAX_STOP_LENGTH} characters"))

    penalty = message.repetition_penalty if message.HasField("repetition_penalty") else 1.0
    if not math.isfinite(penalty) or penalty <= 0.0:
        bad.append(FieldViolation(f"{field}.repetition_penalty", f"must be a finite number > 0, got {penalty}"))

    seed = message.seed if message.HasField("seed") else None
    sampling = Sampling(
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=int(top_k),
        max_tokens=int(max_tokens),
        stop=stop,
        seed=seed,
        repetition_penalty=float(penalty),
    )
    return sampling, bad
