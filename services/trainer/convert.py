"""Translations between the trainer's protobuf messages and its core's dataclasses (requests, jobs,
events, datasets, adapters); the only module besides server.py that knows the protobuf types."""

from __future__ import annotations

import math

from google.protobuf import timestamp_pb2

from ragtune.controlplane.jobs import EventRecord, JobRecord
from ragtune.errors import InvalidArgument
from ragtune.gate_metrics import gate_metric_name, gate_metric_value
from ragtune.registry import AdapterVersion
from ragtune.v1 import trainer_pb2
from services.trainer.core import DatasetCheck
from services.trainer.datasets import DatasetInfo
from services.trainer.jobspec import SpecRequest
from services.trainer.validation import FORMATS, ValidationReport

METHOD_NAMES = {
    trainer_pb2.TRAINING_METHOD_UNSPECIFIED: "lora",
    trainer_pb2.TRAINING_METHOD_LORA: "lora",
    trainer_pb2.TRAINING_METHOD_SELECTIVE: "selective",
    trainer_pb2.TRAINING_METHOD_IA3: "ia3",
    trainer_pb2.TRAINING_METHOD_PROMPT_TUNING: "prompt_tuning",
    trainer_pb2.TRAINING_METHOD_DPO: "dpo",
}
METHOD_ENUMS = {name: value for value, name in METHOD_NAMES.items() if value}
FORMAT_ENUMS = dict(
    zip(
        FORMATS,
        (
            trainer_pb2.DATASET_FORMAT_CHAT,
            trainer_pb2.DATASET_FORMAT_PROMPT_COMPLETION,
            trainer_pb2.DATASET_FORMAT_INSTRUCTION,
            trainer_pb2.DATASET_FORMAT_PREFERENCE,
        ),
    )
)
FORMAT_NAMES = {value: name for name, value in FORMAT_ENUMS.items()}
HYPERPARAMETER_FIELDS = [f.name for f in trainer_pb2.Hyperparameters.DESCRIPTOR.fields]


def method_name(value: int) -> str:
    # An unknown number passes through as a name no method has, and validation reports it.
    return METHOD_NAMES.get(value, f"TrainingMethod({value})")


def state_enum(state: str) -> int:
    return trainer_pb2.JobState.Value(f"JOB_STATE_{state}")


def state_filter(value: int) -> str | None:
    """ListJobs' state filter: None for unspecified; an unknown number as a name no state has."""
    if not value:
        return None
    if value not in trainer_pb2.JobState.values():
        return f"JobState({value})"
    return trainer_pb2.JobState.Name(value).removeprefix("JOB_STATE_")


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def spec_request(spec: trainer_pb2.JobSpec) -> SpecRequest:
    """The client's values (zero means unset, as proto3 cannot tell)."""
    lora = None
    if spec.HasField("lora"):
        lora = {
            "r": spec.lora.r,
            "alpha": spec.lora.alpha,
            "dropout": spec.lora.dropout,
            "target_modules": list(spec.lora.target_modules),
        }
    hp = {name: getattr(spec.hyperparameters, name) for name in HYPERPARAMETER_FIELDS}
    gate = None
    if spec.HasField("gate"):
        try:
            eval_set = spec.gate.eval_set.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument("spec.gate.eval_set", "must be UTF-8 JSONL") from None
        gate = {"eval_set": eval_set, "alias": spec.gate.alias, "metric": gate_metric_name(spec.gate.metric),
                "margin": spec.gate.margin, "collection": spec.gate.collection}
    return SpecRequest(spec.adapter_name, spec.dataset, method_name(spec.method), lora, hp, gate)


def gate_message(gate: dict | None) -> trainer_pb2.PromotionGate | None:
    if not gate:
        return None
    return trainer_pb2.PromotionGate(eval_set=gate["eval_set"].encode(), alias=gate["alias"],
                                     metric=gate_metric_value(gate["metric"]), margin=gate["margin"],
                                     collection=gate["collection"])


def gate_evaluation_spec(job_id: str, adapter: str, candidate: int, incumbent: int, gate: dict) -> bytes:
    """The evaluation a gateway runs for a promotion gate (see gateway.proto GateRun)."""
    from ragtune.v1 import gateway_pb2

    spec = gateway_pb2.EvaluationSpec(eval_set=gate["eval_set"].encode(), collection=gate["collection"])
    spec.sampling.temperature = 0.0
    spec.sampling.max_tokens = 32
    spec.gate_run.CopyFrom(gateway_pb2.GateRun(job_id=job_id, adapter=adapter, candidate_version=candidate,
                                               incumbent_version=incumbent, gate=gate_message(gate)))
    return spec.SerializeToString()


def verdict_message(verdict: dict | None) -> trainer_pb2.GateVerdict | None:
    if not verdict:
        return None
    fields = {f.name for f in trainer_pb2.GateVerdict.DESCRIPTOR.fields}
    return trainer_pb2.GateVerdict(**{k: v for k, v in verdict.items() if k in fields})


def alias_message(record) -> trainer_pb2.AdapterAlias:
    return trainer_pb2.AdapterAlias(
        adapter=record.adapter, alias=record.alias, revision=record.revision, update_time=timestamp(record.update_time),
        targets=[trainer_pb2.AliasTarget(version=t.version, weight=t.weight) for t in record.targets])


def alias_event_message(event) -> trainer_pb2.AliasEvent:
    return trainer_pb2.AliasEvent(
        time=timestamp(event.time), action=event.action, actor=event.actor, reason=event.reason,
        from_targets=[trainer_pb2.AliasTarget(version=t.version, weight=t.weight) for t in event.from_targets],
        to_targets=[trainer_pb2.AliasTarget(version=t.version, weight=t.weight) for t in event.to_targets])


def alias_targets(targets) -> list[tuple[int, int]]:
    return [(t.version, t.weight) for t in targets]


def dataset_check(request: trainer_pb2.ValidateDatasetRequest) -> DatasetCheck:
    fmt = FORMAT_NAMES.get(request.format)
    if fmt is None and request.format != trainer_pb2.DATASET_FORMAT_UNSPECIFIED:
        fmt = f"DatasetFormat({request.format})"  # reported by validation
    return DatasetCheck(request.dataset, fmt, request.max_seq_len or None)


def validation_response(report: ValidationReport) -> trainer_pb2.ValidateDatasetResponse:
    return trainer_pb2.ValidateDatasetResponse(
        valid=report.valid,
        format=FORMAT_ENUMS.get(report.format, 0),
        examples=len(report.examples),
        problems=[trainer_pb2.DatasetProblem(line=p.line, field=p.field, message=p.message) for p in report.problems],
    )


def upload_response(info: DatasetInfo) -> trainer_pb2.UploadDatasetResponse:
    return trainer_pb2.UploadDatasetResponse(
        name=info.name, size_bytes=info.size_bytes, sha256=info.sha256, lines=info.lines
    )


def _lora_message(lora: dict | None) -> trainer_pb2.LoraConfig | None:
    if not lora:
        return None
    return trainer_pb2.LoraConfig(
        r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"], target_modules=lora["target_modules"]
    )


def _hyperparameters_message(hp: dict) -> trainer_pb2.Hyperparameters:
    return trainer_pb2.Hyperparameters(**{k: v for k, v in hp.items() if k in HYPERPARAMETER_FIELDS})


def spec_message(spec: dict) -> trainer_pb2.JobSpec:
    return trainer_pb2.JobSpec(
        adapter_name=spec["adapter_name"],
        dataset=spec["dataset"],
        method=METHOD_ENUMS[spec["method"]],
        lora=_lora_message(spec.get("lora")),
        hyperparameters=_hyperparameters_message(spec["hyperparameters"]),
        gate=gate_message(spec.get("gate")),
    )


def metrics_message(metrics: dict | None) -> trainer_pb2.TrainingMetrics | None:
    if not metrics:
        return None
    message = trainer_pb2.TrainingMetrics(
        train_loss=metrics["train_loss"],
        steps=metrics["steps"],
        tokens_per_second=metrics["tokens_per_second"],
        trainable_fraction=metrics["trainable_fraction"],
        peak_memory_bytes=metrics["peak_memory_bytes"],
    )
    if metrics.get("validation_loss") is not None and not math.isnan(metrics["validation_loss"]):
        message.validation_loss = metrics["validation_loss"]
    return message


def job_message(job: JobRecord) -> trainer_pb2.Job:
    return trainer_pb2.Job(
        id=job.id,
        spec=spec_message(job.spec),
        state=state_enum(job.state),
        error=job.error,
        dataset_problems=[trainer_pb2.DatasetProblem(**p) for p in job.problems],
        step=job.step,
        total_steps=job.total_steps,
        metrics=metrics_message(job.metrics),
        adapter_path=job.adapter_path,
        create_time=timestamp(job.create_time),
        update_time=timestamp(job.update_time),
        client_request_id=job.client_request_id,
        gate_verdict=verdict_message((job.metrics or {}).get("gate_verdict")),
    )


def event_message(event: EventRecord) -> trainer_pb2.JobEvent:
    message = trainer_pb2.JobEvent(sequence=event.sequence, time=timestamp(event.time), state=state_enum(event.state))
    p = event.payload
    if event.kind == "state_changed":
        message.state_changed = state_enum(p["state"])
    elif event.kind == "progress":
        message.progress.CopyFrom(trainer_pb2.StepProgress(**p))
    elif event.kind == "epoch_end":
        message.epoch_end.CopyFrom(trainer_pb2.EpochEnd(epoch=p["epoch"], train_loss=p["train_loss"]))
        if p.get("validation_loss") is not None:
            message.epoch_end.validation_loss = p["validation_loss"]
    elif event.kind == "checkpoint_saved":
        message.checkpoint_saved_step = p["step"]
    elif event.kind == "final_metrics":
        message.final_metrics.CopyFrom(metrics_message(p))
    else:
        message.message = p.get("text", "")
    return message


def adapter_message(adapter: AdapterVersion, aliases: list[str] = ()) -> trainer_pb2.Adapter:
    meta = adapter.metadata
    message = trainer_pb2.Adapter(
        aliases=list(aliases),
        name=adapter.name,
        version=adapter.version,
        registry_path=adapter.registry_path,
        base_model=meta.get("base_model", ""),
        method=METHOD_ENUMS.get(meta.get("method", ""), 0),
        dataset_sha256=meta.get("dataset_sha256", ""),
        job_id=meta.get("job_id", ""),
        servable=bool(meta.get("servable", False)),
        lora=_lora_message(meta.get("lora")),
        metrics=metrics_message(meta.get("metrics")),
    )
    if meta.get("hyperparameters"):
        message.hyperparameters.CopyFrom(_hyperparameters_message(meta["hyperparameters"]))
    if meta.get("created_time"):
        message.create_time.FromJsonString(meta["created_time"])
    return message
