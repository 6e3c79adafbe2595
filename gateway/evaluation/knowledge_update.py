"""The knowledge-update measurement: how long RAG (an ingest) and fine-tuning (a LoRA job, followed
through WatchJob) each take to make new facts answerable, and how well each answers afterwards.

Scratch names derive from the evaluation id, so a replica that resumes an evaluation reuses the
ingest and the training job (CreateJob's client_request_id) instead of training twice."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import grpc

from ragtune.errors import ServiceError
from ragtune.v1 import gateway_pb2, retriever_pb2, trainer_pb2
from gateway.downstream import CallBudget, Downstream
from gateway.evaluation.evalset import parse_eval_set
from gateway.evaluation.results import ArmResult, EvalItem, KnowledgeUpdate
from gateway.evaluation.scoring import describe, quality

JOB_TIMEOUT_S = 3600.0
_FINAL_JOB_STATES = (trainer_pb2.JOB_STATE_SUCCEEDED, trainer_pb2.JOB_STATE_FAILED, trainer_pb2.JOB_STATE_CANCELLED)

# (items, arm name, collection, adapter) -> the arm answered
AnswerArm = Callable[[list[EvalItem], str, str, str], Awaitable[ArmResult]]


async def _train(down: Downstream, ku: gateway_pb2.KnowledgeUpdateSpec, scratch: str,
                 budget: CallBudget) -> trainer_pb2.Job:
    async def upload():  # in 1 MiB messages: the trainer takes at most 2 MiB a message (ragtune/request_limits.py)
        data, size = ku.finetune_dataset, 1 << 20
        for start in range(0, max(len(data), 1), size):
            yield trainer_pb2.UploadDatasetRequest(name=scratch if start == 0 else "", content=data[start:start + size])

    await down.trainer.upload_dataset(upload(), budget)
    job_spec = trainer_pb2.JobSpec(adapter_name=scratch, dataset=scratch, method=trainer_pb2.TRAINING_METHOD_LORA)
    job_spec.hyperparameters.CopyFrom(ku.hyperparameters)
    job = (await down.trainer.create_job(trainer_pb2.CreateJobRequest(
        spec=job_spec, client_request_id=scratch), budget)).job
    if job.state not in _FINAL_JOB_STATES:
        # Follow the job's own event stream to its final state (no polling).
        async for update in down.trainer.watch_job(trainer_pb2.WatchJobRequest(id=job.id), budget):
            if update.event.WhichOneof("event") == "state_changed" and update.event.state_changed in _FINAL_JOB_STATES:
                break
        job = (await down.trainer.get_job(trainer_pb2.GetJobRequest(id=job.id), budget)).job
    return job


async def measure(down: Downstream, answer_arm: AnswerArm, tenant: str, evaluation_id: str,
                  ku: gateway_pb2.KnowledgeUpdateSpec) -> KnowledgeUpdate:
    items = parse_eval_set(ku.eval_set)
    result = KnowledgeUpdate(facts=len(ku.facts))
    scratch = f"ku-{evaluation_id}"
    budget = CallBudget(tenant=tenant, deadline=time.monotonic() + JOB_TIMEOUT_S)
    try:
        try:
            await down.retriever.create_collection(retriever_pb2.CreateCollectionRequest(
                collection=retriever_pb2.Collection(name=scratch)), budget)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:  # made by a replica that died mid-run
                raise
        started = time.perf_counter()
        await down.retriever.upsert_documents(retriever_pb2.UpsertDocumentsRequest(
            collection=scratch, documents=ku.facts), budget)
        result.rag_seconds = time.perf_counter() - started
        result.rag_quality = quality(await answer_arm(items, "rag", scratch, ""))

        started = time.perf_counter()
        job = await _train(down, ku, scratch, budget)
        if job.state != trainer_pb2.JOB_STATE_SUCCEEDED:
            raise RuntimeError(
                f"the knowledge-update training job ended {trainer_pb2.JobState.Name(job.state)}: {job.error}")
        result.finetune_seconds = time.perf_counter() - started
        result.finetune_quality = quality(await answer_arm(items, "finetuned", "", scratch))
    except (ServiceError, grpc.aio.AioRpcError, RuntimeError) as exc:
        result.error = describe(exc)
    return result


async def clean_up(down: Downstream, tenant: str, evaluation_id: str) -> None:
    """Removes the scratch collection and adapter (once the result is saved)."""
    scratch = f"ku-{evaluation_id}"
    budget = CallBudget(tenant=tenant, deadline=time.monotonic() + 60)
    for call, request in (
        (down.retriever.delete_collection, retriever_pb2.DeleteCollectionRequest(name=scratch)),
        (down.trainer.delete_adapter, trainer_pb2.DeleteAdapterRequest(name=scratch)),
    ):
        try:
            await call(request, budget)
        except (ServiceError, grpc.aio.AioRpcError):
            pass  # nothing was created under that name
