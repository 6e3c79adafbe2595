"""The promotion gate's metric, between its trainer.proto enum (GateMetric) and the name the trainer stores
and the gateway scores by: derived from the enum's own names, so a metric added to the proto needs no table."""

from __future__ import annotations

from ragtune.v1 import trainer_pb2

_PREFIX = "GATE_METRIC_"
DEFAULT_GATE_METRIC = "token_f1"  # GATE_METRIC_UNSPECIFIED


def gate_metric_name(value: int) -> str:
    """"token_f1", "exact_match", "rouge_l", "citation_precision" for the enum number (unset: token F1)."""
    if value == trainer_pb2.GATE_METRIC_UNSPECIFIED:
        return DEFAULT_GATE_METRIC
    return trainer_pb2.GateMetric.Name(value).removeprefix(_PREFIX).lower()


def gate_metric_value(name: str) -> int:
    return trainer_pb2.GateMetric.Value(_PREFIX + name.upper())
