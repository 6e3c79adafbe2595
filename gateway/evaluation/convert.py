"""Conversions between the evaluation's records (plain dicts and dataclasses in the control plane)
and its protobuf messages."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from google.protobuf import json_format

from ragtune.controlplane import evaluations as states
from ragtune.controlplane.evaluations import EvaluationRecord
from ragtune.v1 import gateway_pb2
from gateway.evaluation.results import ArmResult, EvalRun, KnowledgeUpdate, QuestionResult
from gateway.evaluation.spec import ARM_ENUMS

STATE_ENUMS = {
    states.QUEUED: gateway_pb2.EVALUATION_STATE_QUEUED,
    states.RUNNING: gateway_pb2.EVALUATION_STATE_RUNNING,
    states.SUCCEEDED: gateway_pb2.EVALUATION_STATE_SUCCEEDED,
    states.FAILED: gateway_pb2.EVALUATION_STATE_FAILED,
    states.CANCELLED: gateway_pb2.EVALUATION_STATE_CANCELLED,
}


def snapshot_dict(snapshot: gateway_pb2.Evaluation) -> dict:
    return json_format.MessageToDict(snapshot, preserving_proto_field_name=True)


def evaluation_message(record: EvaluationRecord, artifact_root: Path) -> gateway_pb2.Evaluation:
    """The Evaluation clients see: the stored snapshot, with state and error from the record."""
    message = json_format.ParseDict(record.snapshot, gateway_pb2.Evaluation(), ignore_unknown_fields=True)
    message.id = record.id
    message.state = STATE_ENUMS[record.state]
    message.error = record.error
    message.report_folder = str(artifact_root / record.report_path) if record.report_path else ""
    return message


def result_dict(result: QuestionResult) -> dict:
    return dataclasses.asdict(result)


def result_of(data: dict) -> QuestionResult:
    return QuestionResult(**data)


def knowledge_update_dict(update: KnowledgeUpdate) -> dict:
    return dataclasses.asdict(update)


def knowledge_update_of(data: dict) -> KnowledgeUpdate:
    return KnowledgeUpdate(**data)


def fill_snapshot(snapshot: gateway_pb2.Evaluation, run: EvalRun) -> None:
    """Copies the run's arm summaries, knowledge update and recommendation into the snapshot."""
    del snapshot.arms[:]
    for arm in run.arms:
        snapshot.arms.append(arm_summary_pb(arm))
    if run.knowledge_update is not None:
        ku = run.knowledge_update
        snapshot.knowledge_update.CopyFrom(gateway_pb2.KnowledgeUpdateResult(
            facts=ku.facts, rag_seconds=ku.rag_seconds or 0.0, finetune_seconds=ku.finetune_seconds or 0.0,
            rag_token_f1=ku.rag_quality.get("token_f1", 0.0), finetune_token_f1=ku.finetune_quality.get("token_f1", 0.0),
            error=ku.error,
        ))
    if run.recommendation is not None:
        snapshot.recommended_arm = run.recommendation.arm
        del snapshot.reasons[:]
        snapshot.reasons.extend(run.recommendation.reasons)


def arm_summary_pb(arm: ArmResult) -> gateway_pb2.ArmSummary:
    """Copies the summary dict of summarize_arm into the ArmSummary message."""
    s = arm.summary or {}
    out = gateway_pb2.ArmSummary(arm=ARM_ENUMS.get(arm.name, 0), failed=arm.failed, error=arm.error)

    def estimate(name: str) -> gateway_pb2.MetricEstimate:
        value = s.get(name) or {}
        return gateway_pb2.MetricEstimate(mean=_num(value.get("mean")), ci_low=_num(value.get("ci_low")),
                                          ci_high=_num(value.get("ci_high")))

    out.exact_match.CopyFrom(estimate("exact_match"))
    out.token_f1.CopyFrom(estimate("token_f1"))
    out.rouge_l.CopyFrom(estimate("rouge_l"))
    for key in ("recall_at_k", "mrr", "citation_precision"):
        value = (s.get(key) or {}).get("mean")
        if value is not None:
            setattr(out, key, _num(value))
    out.ttft_p50_ms = _num((s.get("ttft_ms") or {}).get("p50"))
    out.ttft_p95_ms = _num((s.get("ttft_ms") or {}).get("p95"))
    out.total_p50_ms = _num((s.get("total_ms") or {}).get("p50"))
    out.total_p95_ms = _num((s.get("total_ms") or {}).get("p95"))
    out.mean_prompt_tokens = _num(s.get("prompt_tokens"))
    out.mean_completion_tokens = _num(s.get("completion_tokens"))
    out.mean_compute_seconds = _num(s.get("compute_s"))
    out.failed_questions = int(s.get("failed") or 0)
    return out


def _num(value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 0.0
    return value if math.isfinite(value) else 0.0
