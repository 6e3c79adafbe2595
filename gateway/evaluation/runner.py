"""Runs evaluations inside the gateway as background jobs: every question through each arm via the
same AskPipeline that serves Ask, scored, summarised, reported; progress is watchable, a run is
cancellable, and results are kept on disk under <RAGTUNE_HOME>/gateway/evaluations/<tenant>/<id>/."""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import grpc
from google.protobuf import json_format

from ragtune.errors import FieldViolation, InvalidArgument, NotFound, ServiceError
from ragtune.registry import parse_adapter_ref
from ragtune.v1 import gateway_pb2, retriever_pb2, trainer_pb2
from gateway.downstream import CallBudget, Downstream
from gateway.evaluation.evalset import parse_eval_set
from gateway.evaluation.metrics import (
    citation_precision,
    exact_match,
    recall_at_k,
    reciprocal_rank,
    rouge_l,
    token_f1,
)
from gateway.evaluation.recommend import recommend, validate_constraints
from gateway.evaluation.report import write_report
from gateway.evaluation.results import (
    ArmResult,
    Constraints,
    EvalItem,
    EvalRun,
    KnowledgeUpdate,
    QuestionResult,
)
from gateway.evaluation.summary import summarize_arm
from gateway.rag import AskPipeline

log = logging.getLogger(__name__)

_ARM_NAMES = {
    gateway_pb2.EVALUATION_ARM_BASE: "base",
    gateway_pb2.EVALUATION_ARM_RAG: "rag",
    gateway_pb2.EVALUATION_ARM_FINETUNED: "finetuned",
    gateway_pb2.EVALUATION_ARM_RAG_FINETUNED: "rag_finetuned",
}
_ARM_ENUMS = {name: value for value, name in _ARM_NAMES.items()}
_FINAL = (gateway_pb2.EVALUATION_STATE_SUCCEEDED, gateway_pb2.EVALUATION_STATE_FAILED,
          gateway_pb2.EVALUATION_STATE_CANCELLED)
QUESTION_TIMEOUT_S = 300.0
JOB_TIMEOUT_S = 3600.0


@dataclass
class EvaluationJob:
    tenant: str
    snapshot: gateway_pb2.Evaluation
    folder: Path
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    task: asyncio.Task | None = None

    async def publish(self) -> None:
        """Persists the snapshot and wakes the watchers."""
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "evaluation.json").write_text(json_format.MessageToJson(self.snapshot))
        async with self.changed:
            self.changed.notify_all()


def _arms_of(spec: gateway_pb2.EvaluationSpec) -> list[str]:
    if spec.arms:
        return [_ARM_NAMES[a] for a in spec.arms if a in _ARM_NAMES]
    return ["base", "rag", "finetuned", "rag_finetuned"] if spec.adapter else ["base", "rag"]


def constraints_of(spec: gateway_pb2.EvaluationSpec) -> Constraints:
    c = spec.constraints
    return Constraints(
        data_change=c.data_change or "monthly",
        latency_budget_ms=c.latency_budget_ms if c.HasField("latency_budget_ms") else None,
        cost_budget_tokens=c.cost_budget_tokens if c.HasField("cost_budget_tokens") else None,
    )


def validate_spec(spec: gateway_pb2.EvaluationSpec) -> tuple[list[EvalItem], list[str]]:
    problems: list[FieldViolation] = []
    try:
        items = parse_eval_set(spec.eval_set)
    except InvalidArgument as exc:
        problems.extend(FieldViolation("spec." + v.field, v.description) for v in exc.violations)
        items = []
    arms = _arms_of(spec)
    if any(a not in _ARM_NAMES for a in spec.arms):
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


class EvaluationRunner:
    def __init__(self, pipeline: AskPipeline, downstream: Downstream, root: Path):
        self._pipeline = pipeline
        self._down = downstream
        self._root = root
        self._jobs: dict[tuple[str, str], EvaluationJob] = {}
        self._load_kept()

    def _load_kept(self) -> None:
        """Evaluations kept on disk stay listable; one that was running when the gateway stopped is FAILED."""
        for path in self._root.glob("*/*/evaluation.json"):
            snapshot = json_format.Parse(path.read_text(), gateway_pb2.Evaluation())
            if snapshot.state not in _FINAL:
                snapshot.state = gateway_pb2.EVALUATION_STATE_FAILED
                snapshot.error = "the gateway restarted while this evaluation ran"
            self._jobs[(path.parent.parent.name, snapshot.id)] = EvaluationJob(path.parent.parent.name, snapshot, path.parent)

    def get(self, tenant: str, evaluation_id: str) -> EvaluationJob:
        job = self._jobs.get((tenant, evaluation_id))
        if job is None:
            raise NotFound(f"id: no evaluation {evaluation_id!r}")
        return job

    def list(self, tenant: str) -> list[gateway_pb2.Evaluation]:
        jobs = [j for (t, _), j in self._jobs.items() if t == tenant]
        return [j.snapshot for j in sorted(jobs, key=lambda j: j.folder.stat().st_mtime if j.folder.exists() else 0, reverse=True)]

    async def create(self, tenant: str, spec: gateway_pb2.EvaluationSpec, budget: CallBudget) -> gateway_pb2.Evaluation:
        items, arms = validate_spec(spec)
        await self._check_targets(spec, arms, budget)
        evaluation_id = uuid.uuid4().hex[:12]
        snapshot = gateway_pb2.Evaluation(
            id=evaluation_id, state=gateway_pb2.EVALUATION_STATE_RUNNING, questions=len(items),
            answers_total=len(items) * len(arms),
        )
        job = EvaluationJob(tenant, snapshot, self._root / tenant / evaluation_id)
        snapshot.report_folder = str(job.folder)
        self._jobs[(tenant, evaluation_id)] = job
        await job.publish()
        job.task = asyncio.create_task(self._run(job, spec, items, arms))
        return snapshot

    async def _check_targets(self, spec, arms: list[str], budget: CallBudget) -> None:
        """NOT_FOUND now, not minutes into the run, for an unknown collection or adapter."""
        if any(a.startswith("rag") for a in arms):
            await self._down.unary("retriever", self._down.retriever.GetCollection,
                                   retriever_pb2.GetCollectionRequest(name=spec.collection), budget, idempotent=True)
        if any("finetuned" in a for a in arms):
            name, version = parse_adapter_ref(spec.adapter, "spec.adapter")
            await self._down.unary("trainer", self._down.trainer.GetAdapter,
                                   trainer_pb2.GetAdapterRequest(name=name, version=version or 0), budget, idempotent=True)

    async def cancel(self, tenant: str, evaluation_id: str) -> gateway_pb2.Evaluation:
        job = self.get(tenant, evaluation_id)
        if job.task is not None and not job.task.done():
            job.task.cancel()
            try:
                await job.task
            except asyncio.CancelledError:
                pass
        return job.snapshot

    async def watch(self, tenant: str, evaluation_id: str) -> AsyncIterator[gateway_pb2.Evaluation]:
        job = self.get(tenant, evaluation_id)
        while True:
            async with job.changed:
                current = gateway_pb2.Evaluation()
                current.CopyFrom(job.snapshot)
                yield current
                if current.state in _FINAL:
                    return
                await job.changed.wait()

    async def close(self) -> None:
        for job in self._jobs.values():
            if job.task is not None and not job.task.done():
                job.task.cancel()

    # --- the run -------------------------------------------------------------------------------

    async def _run(self, job: EvaluationJob, spec, items: list[EvalItem], arms: list[str]) -> None:
        run = EvalRun(
            id=job.snapshot.id, collection=spec.collection, adapter=spec.adapter, top_k=spec.top_k or 4,
            arms=[ArmResult(name=a) for a in arms],
            constraints=constraints_of(spec),
            created_time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        # The final state is set only after the report is on disk: watchers stop at a final state
        # and then read the report.
        final_state, error = gateway_pb2.EVALUATION_STATE_SUCCEEDED, ""
        try:
            for arm in run.arms:
                await self._run_arm(job, spec, arm, items, spec.collection, spec.adapter)
            if spec.HasField("knowledge_update"):
                run.knowledge_update = await self._knowledge_update(job, spec)
            run.recommendation = recommend(run.arms, run.knowledge_update, run.constraints)
        except asyncio.CancelledError:
            final_state = gateway_pb2.EVALUATION_STATE_CANCELLED
        except Exception as exc:  # noqa: BLE001 - the run fails, the gateway keeps serving
            log.exception("evaluation %s failed", job.snapshot.id)
            final_state, error = gateway_pb2.EVALUATION_STATE_FAILED, _describe(exc)
        finally:
            for arm in run.arms:
                if arm.questions and not arm.summary:
                    arm.summary = summarize_arm(arm.questions)
            self._fill_snapshot(job.snapshot, run)
            await asyncio.to_thread(write_report, run, job.folder)
            job.snapshot.state, job.snapshot.error = final_state, error
            await job.publish()

    async def _ask(self, tenant: str, item: EvalItem, arm: str, spec, collection: str, adapter: str) -> QuestionResult:
        retrieval = arm.startswith("rag")
        q = gateway_pb2.AskQuestion(
            question=item.question, collection=collection if retrieval else "", no_retrieval=not retrieval,
            adapter=adapter if "finetuned" in arm else "", top_k=spec.top_k,
        )
        q.sampling.CopyFrom(spec.sampling)
        if not q.sampling.HasField("max_tokens"):
            q.sampling.max_tokens = 64
        result = QuestionResult(item_id=item.id, question=item.question, references=item.references)
        budget = CallBudget(tenant=tenant, deadline=time.monotonic() + QUESTION_TIMEOUT_S)
        try:
            reply = await self._pipeline.ask(q, budget)
        except (ServiceError, grpc.aio.AioRpcError) as exc:
            result.error = _describe(exc)
            return result
        result.answer = reply.answer
        result.exact_match = exact_match(reply.answer, item.references)
        result.token_f1 = token_f1(reply.answer, item.references)
        result.rouge_l = rouge_l(reply.answer, item.references)
        result.ttft_ms = reply.timing.time_to_first_token_ms
        result.total_ms = reply.timing.total_ms
        result.prompt_tokens = reply.usage.prompt_tokens
        result.completion_tokens = reply.usage.completion_tokens
        result.compute_s = (reply.timing.retrieval_ms + reply.timing.generation_ms) / 1000
        result.retrieved_document_ids = [c.document_id for c in reply.context]
        result.cited_document_ids = [c.document_id for c in reply.citations]
        if retrieval and item.gold_document_ids:
            k = len(reply.context) or spec.top_k or 4
            result.recall_at_k = recall_at_k(result.retrieved_document_ids, item.gold_document_ids, k)
            result.reciprocal_rank = reciprocal_rank(result.retrieved_document_ids, item.gold_document_ids)
            result.citation_precision = citation_precision(result.cited_document_ids, item.gold_document_ids)
        return result

    async def _run_arm(self, job: EvaluationJob, spec, arm: ArmResult, items: list[EvalItem],
                       collection: str, adapter: str, count_progress: bool = True) -> None:
        for item in items:
            arm.questions.append(await self._ask(job.tenant, item, arm.name, spec, collection, adapter))
            if count_progress:
                job.snapshot.answers_done += 1
                arm.summary = {}
                await job.publish()
        errors = [q.error for q in arm.questions if q.error]
        if arm.questions and len(errors) == len(arm.questions):
            arm.failed, arm.error = True, errors[0]
        arm.summary = summarize_arm(arm.questions)

    async def _knowledge_update(self, job: EvaluationJob, spec) -> KnowledgeUpdate:
        ku = spec.knowledge_update
        items = parse_eval_set(ku.eval_set)
        result = KnowledgeUpdate(facts=len(ku.facts))
        scratch = f"ku-{job.snapshot.id}"
        budget = CallBudget(tenant=job.tenant, deadline=time.monotonic() + JOB_TIMEOUT_S)
        down = self._down
        try:
            await down.unary("retriever", down.retriever.CreateCollection, retriever_pb2.CreateCollectionRequest(
                collection=retriever_pb2.Collection(name=scratch)), budget)
            started = time.perf_counter()
            await down.unary("retriever", down.retriever.UpsertDocuments, retriever_pb2.UpsertDocumentsRequest(
                collection=scratch, documents=ku.facts), budget)
            result.rag_seconds = time.perf_counter() - started
            rag = ArmResult(name="rag")
            await self._run_arm(job, spec, rag, items, scratch, "", count_progress=False)
            result.rag_quality = _quality(rag)

            started = time.perf_counter()

            async def upload():
                yield trainer_pb2.UploadDatasetRequest(name=scratch, content=ku.finetune_dataset)

            await down.stream_in("trainer", down.trainer.UploadDataset, upload(), budget)
            job_spec = trainer_pb2.JobSpec(adapter_name=scratch, dataset=scratch, method=trainer_pb2.TRAINING_METHOD_LORA)
            job_spec.hyperparameters.CopyFrom(ku.hyperparameters)
            created = await down.unary("trainer", down.trainer.CreateJob, trainer_pb2.CreateJobRequest(
                spec=job_spec, client_request_id=scratch), budget)
            training = created.job
            while training.state not in (trainer_pb2.JOB_STATE_SUCCEEDED, trainer_pb2.JOB_STATE_FAILED,
                                         trainer_pb2.JOB_STATE_CANCELLED):
                await asyncio.sleep(1.0)
                training = (await down.unary("trainer", down.trainer.GetJob,
                                             trainer_pb2.GetJobRequest(id=training.id), budget, idempotent=True)).job
            if training.state != trainer_pb2.JOB_STATE_SUCCEEDED:
                raise RuntimeError(f"the knowledge-update training job ended {trainer_pb2.JobState.Name(training.state)}: {training.error}")
            result.finetune_seconds = time.perf_counter() - started
            tuned = ArmResult(name="finetuned")
            await self._run_arm(job, spec, tuned, items, "", scratch, count_progress=False)
            result.finetune_quality = _quality(tuned)
        except (ServiceError, grpc.aio.AioRpcError, RuntimeError) as exc:
            result.error = _describe(exc)
        finally:
            for call, request in (
                (down.retriever.DeleteCollection, retriever_pb2.DeleteCollectionRequest(name=scratch)),
                (down.trainer.DeleteAdapter, trainer_pb2.DeleteAdapterRequest(name=scratch)),
            ):
                try:
                    await down.unary("cleanup", call, request, budget)
                except (ServiceError, grpc.aio.AioRpcError):
                    pass  # nothing was created under that name
        return result

    def _fill_snapshot(self, snapshot: gateway_pb2.Evaluation, run: EvalRun) -> None:
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


def _quality(arm: ArmResult) -> dict[str, float]:
    ok = [q for q in arm.questions if not q.error]
    if not ok:
        return {}
    return {
        "token_f1": sum(q.token_f1 for q in ok) / len(ok),
        "exact_match": sum(q.exact_match for q in ok) / len(ok),
    }


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, ServiceError):
        return f"{exc.code.name}: {exc.message}"
    return f"{type(exc).__name__}: {exc}"


def arm_summary_pb(arm: ArmResult) -> gateway_pb2.ArmSummary:
    """Copies the summary dict of summarize_arm into the ArmSummary message."""
    s = arm.summary or {}
    out = gateway_pb2.ArmSummary(arm=_ARM_ENUMS.get(arm.name, 0), failed=arm.failed, error=arm.error)

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
