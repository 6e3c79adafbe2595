"""What an evaluation request asks for: its arms, constraints and eval set, validated as a whole
(every problem reported at once, with its field and line)."""

from __future__ import annotations

from ragtune.errors import FieldViolation, InvalidArgument
from ragtune.v1 import gateway_pb2
from gateway.evaluation.evalset import parse_eval_set
from gateway.evaluation.recommend import validate_constraints
from gateway.evaluation.results import Constraints, EvalItem

ARM_NAMES = {
    gateway_pb2.EVALUATION_ARM_BASE: "base",
    gateway_pb2.EVALUATION_ARM_RAG: "rag",
    gateway_pb2.EVALUATION_ARM_FINETUNED: "finetuned",
    gateway_pb2.EVALUATION_ARM_RAG_FINETUNED: "rag_finetuned",
    gateway_pb2.EVALUATION_ARM_CANDIDATE: "candidate",
    gateway_pb2.EVALUATION_ARM_INCUMBENT: "incumbent",
}
GATE_ARMS = ("candidate", "incumbent")
ARM_ENUMS = {name: value for value, name in ARM_NAMES.items()}


def arms_of(spec: gateway_pb2.EvaluationSpec) -> list[str]:
    if spec.HasField("gate_run"):
        return list(GATE_ARMS)
    if spec.arms:
        return [ARM_NAMES[a] for a in spec.arms if a in ARM_NAMES]
    return ["base", "rag", "finetuned", "rag_finetuned"] if spec.adapter else ["base", "rag"]


def arm_plan(arm: str, spec: gateway_pb2.EvaluationSpec) -> tuple[bool, str, str]:
    """How an arm asks: (with retrieval, collection, adapter reference)."""
    if arm in GATE_ARMS:
        run = spec.gate_run
        version = run.candidate_version if arm == "candidate" else run.incumbent_version
        adapter = f"{run.adapter}/{version}" if version else ""
        return bool(run.gate.collection), run.gate.collection, adapter
    retrieval = arm.startswith("rag")
    return retrieval, spec.collection if retrieval else "", spec.adapter if "finetuned" in arm else ""


def constraints_of(spec: gateway_pb2.EvaluationSpec) -> Constraints:
    c = spec.constraints
    return Constraints(
        data_change=c.data_change or "monthly",
        latency_budget_ms=c.latency_budget_ms if c.HasField("latency_budget_ms") else None,
        cost_budget_tokens=c.cost_budget_tokens if c.HasField("cost_budget_tokens") else None,
    )


def validate_spec(spec: gateway_pb2.EvaluationSpec) -> tuple[list[EvalItem], list[str]]:
    """The eval set's items and the arms to run; InvalidArgument listing every problem otherwise."""
    problems: list[FieldViolation] = []
    try:
        items = parse_eval_set(spec.eval_set)
    except InvalidArgument as exc:
        problems.extend(FieldViolation("spec." + v.field, v.description) for v in exc.violations)
        items = []
    arms = arms_of(spec)
    if spec.HasField("gate_run"):
        if problems:
            raise InvalidArgument.of(problems)
        return items, arms
    if any(a not in ARM_NAMES or ARM_NAMES[a] in GATE_ARMS for a in spec.arms):
        problems.append(FieldViolation("spec.arms", "contains an unknown arm"))
    if any(a.startswith("rag") for a in arms) and not spec.collection:
        problems.append(FieldViolation("spec.collection", "is required for the retrieval arms"))
    if any("finetuned" in a for a in arms) and not spec.adapter:
        problems.append(FieldViolation("spec.adapter", "is required for the fine-tuned arms"))
    if not 0 <= spec.top_k <= 20:
        problems.append(FieldViolation("spec.top_k", "must be between 1 and 20 (0 for the default)"))
    try:
        validate_constraints(constraints_of(spec))
    except InvalidArgument as exc:
        problems.extend(FieldViolation("spec." + v.field, v.description) for v in exc.violations)
    ku = spec.knowledge_update
    if spec.HasField("knowledge_update"):
        if not ku.facts:
            problems.append(FieldViolation("spec.knowledge_update.facts", "must not be empty"))
        if not ku.finetune_dataset:
            problems.append(FieldViolation("spec.knowledge_update.finetune_dataset", "must not be empty"))
        try:
            parse_eval_set(ku.eval_set)
        except InvalidArgument as exc:
            problems.extend(FieldViolation("spec.knowledge_update." + v.field, v.description) for v in exc.violations)
    if problems:
        raise InvalidArgument.of(problems)
    return items, arms


def validate_gate(gate) -> list[EvalItem]:
    """A job's promotion gate (trainer_pb2.PromotionGate): its eval set, alias and margin."""
    import math

    from ragtune.controlplane.aliases import validate_alias

    problems: list[FieldViolation] = []
    items: list[EvalItem] = []
    try:
        items = parse_eval_set(gate.eval_set)
    except InvalidArgument as exc:
        problems.extend(FieldViolation("request.spec.gate." + v.field, v.description) for v in exc.violations)
    try:
        validate_alias(gate.alias, "request.spec.gate.alias")
    except InvalidArgument as exc:
        problems.extend(exc.violations)
    if not math.isfinite(gate.margin) or not 0 <= gate.margin <= 1:
        problems.append(FieldViolation("request.spec.gate.margin", "must be between 0 and 1"))
    if problems:
        raise InvalidArgument.of(problems)
    return items
