"""The fine-tuning jobs API (/v1/fine_tuning/jobs ...) mapped onto the trainer: CreateJob, ListJobs,
GetJob, CancelJob, WatchJob (events) and the adapter a job wrote (its checkpoint, usable as `model`).
ragtune-only settings (the PEFT method, LoRA rank, any trainer hyperparameter) go in a `ragtune` field."""

from __future__ import annotations

import asyncio
from typing import Any

from google.protobuf import json_format
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.http.context import FrontState, check_fields, json_body, number, string
from ragtune.errors import InvalidArgument
from ragtune.v1 import trainer_pb2 as pb

KNOWN = {"model", "training_file", "suffix", "hyperparameters", "method", "seed", "metadata", "ragtune",
         "validation_file", "integrations"}
UNSUPPORTED = {"validation_file": "is not supported: the trainer holds out ragtune.hyperparameters."
                                  "validation_fraction of training_file instead",
               "integrations": "is not supported by this server"}
_STATUS = {pb.JOB_STATE_QUEUED: "queued", pb.JOB_STATE_VALIDATING: "validating_files",
           pb.JOB_STATE_RUNNING: "running", pb.JOB_STATE_EVALUATING: "running", pb.JOB_STATE_SUCCEEDED: "succeeded",
           pb.JOB_STATE_FAILED: "failed", pb.JOB_STATE_CANCELLED: "cancelled"}
_TERMINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}
_METHODS = {"lora": pb.TRAINING_METHOD_LORA, "ia3": pb.TRAINING_METHOD_IA3, "selective": pb.TRAINING_METHOD_SELECTIVE,
            "prompt_tuning": pb.TRAINING_METHOD_PROMPT_TUNING, "dpo": pb.TRAINING_METHOD_DPO}
_IDLE_S = 0.3  # a running job's recorded events arrive at once; then WatchJob waits for new ones


def _value(hp: dict, name: str, field: str, where: str):
    kind = float if field == "dpo_beta" else int
    value = hp[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise InvalidArgument(f"{where}.{name}", f"must be 'auto' or {'a number' if kind is float else 'an integer'}")
    return kind(value)


def _hyperparameters(hp: Any, where: str, target: pb.Hyperparameters) -> None:
    if hp is None:
        return
    if not isinstance(hp, dict):
        raise InvalidArgument(where, "must be an object")
    for name in hp:
        if name not in ("n_epochs", "batch_size", "learning_rate_multiplier", "beta"):
            raise InvalidArgument(f"{where}.{name}", "unrecognized hyperparameter")
    if hp.get("learning_rate_multiplier") not in (None, "auto"):
        raise InvalidArgument(f"{where}.learning_rate_multiplier",
                              "is not supported: set ragtune.hyperparameters.learning_rate instead")
    for name, field in (("n_epochs", "epochs"), ("batch_size", "batch_size"), ("beta", "dpo_beta")):
        if hp.get(name) not in (None, "auto"):
            setattr(target, field, _value(hp, name, field, where))


async def _spec(state: FrontState, body: dict[str, Any], budget) -> pb.CreateJobRequest:
    check_fields(body, KNOWN, UNSUPPORTED)
    model = string(body, "model", required=True)
    if model != await state.base_model_name(budget):
        raise InvalidArgument("model", f"fine-tuning starts from the base model '{state.base_model}' only")
    spec = pb.JobSpec(dataset=string(body, "training_file", required=True), adapter_name=string(body, "suffix") or "ft")
    _hyperparameters(body.get("hyperparameters"), "hyperparameters", spec.hyperparameters)
    method = body.get("method")
    if method is not None:
        kind = method.get("type") if isinstance(method, dict) else None
        if kind not in ("supervised", "dpo"):
            raise InvalidArgument("method.type", "must be 'supervised' or 'dpo'")
        if kind == "dpo":
            spec.method = pb.TRAINING_METHOD_DPO
        inner = method.get(kind) or {}
        _hyperparameters(inner.get("hyperparameters") if isinstance(inner, dict) else inner,
                         f"method.{kind}.hyperparameters", spec.hyperparameters)
    seed = number(body, "seed", int, 0, (1 << 63) - 1)
    if seed is not None:
        spec.hyperparameters.seed = seed
    request = pb.CreateJobRequest(spec=spec)
    ext = body.get("ragtune")
    if ext is not None:
        if not isinstance(ext, dict):
            raise InvalidArgument("ragtune", "must be an object: {method, lora, hyperparameters, client_request_id}")
        for name in ext:
            if name not in ("method", "lora", "hyperparameters", "client_request_id"):
                raise InvalidArgument(f"ragtune.{name}", "unrecognized")
        if ext.get("method") is not None:
            if ext["method"] not in _METHODS:
                raise InvalidArgument("ragtune.method", f"must be one of {sorted(_METHODS)}")
            spec.method = _METHODS[ext["method"]]
        for name, target in (("lora", spec.lora), ("hyperparameters", spec.hyperparameters)):
            if ext.get(name) is not None:
                try:
                    json_format.ParseDict(ext[name], target)
                except (json_format.ParseError, TypeError, AttributeError) as exc:
                    raise InvalidArgument(f"ragtune.{name}", str(exc)) from None
        request.client_request_id = string(ext, "client_request_id")
    return request


def fine_tuned_model(job: pb.Job) -> str | None:
    """The adapter version a job wrote, as a request's `model` names it ("<name>/<version>")."""
    if job.state != pb.JOB_STATE_SUCCEEDED or not job.adapter_path:
        return None
    _, name, version = job.adapter_path.rsplit("/", 2)
    return f"{name}/{version}"


def job_json(job: pb.Job, base_model: str, tenant: str) -> dict[str, Any]:
    hp = job.spec.hyperparameters
    hyper = {"n_epochs": hp.epochs or "auto", "batch_size": hp.batch_size or "auto", "learning_rate_multiplier": "auto"}
    kind = "dpo" if job.spec.method == pb.TRAINING_METHOD_DPO else "supervised"
    error = None
    if job.state == pb.JOB_STATE_FAILED:
        problem = job.dataset_problems[0] if job.dataset_problems else None
        error = {"code": "invalid_training_file" if problem else "job_failed",
                 "message": job.error or (problem.message if problem else "the job failed"),
                 "param": "training_file" if problem else None}
    finished = job.update_time.seconds if job.state in _TERMINAL else None
    return {
        "id": job.id, "object": "fine_tuning.job", "created_at": job.create_time.seconds, "finished_at": finished,
        "model": base_model, "fine_tuned_model": fine_tuned_model(job), "organization_id": tenant,
        "status": _STATUS.get(job.state, "queued"), "hyperparameters": hyper, "training_file": job.spec.dataset,
        "validation_file": None, "result_files": [], "trained_tokens": None, "error": error,
        "seed": hp.seed, "estimated_finish": None, "integrations": [], "metadata": None,
        "user_provided_suffix": job.spec.adapter_name,
        "method": {"type": kind, kind: {"hyperparameters": hyper}},
        "ragtune": {"adapter": job.spec.adapter_name, "method": pb.TrainingMethod.Name(job.spec.method),
                    "state": pb.JobState.Name(job.state), "step": job.step, "total_steps": job.total_steps,
                    "train_loss": job.metrics.train_loss if job.metrics.steps else None},
    }


def _job_id(request: Request) -> str:
    job_id = request.path_params["job_id"]
    if not job_id or len(job_id) > 64:
        raise InvalidArgument("fine_tuning_job_id", "must be a job id")
    return job_id


def _page(request: Request, items: list[dict]) -> dict[str, Any]:
    """OpenAI's cursor pagination: the items after the one whose id is `after`, `limit` of them."""
    query = request.query_params
    try:
        limit = int(query.get("limit", 20))
    except ValueError:
        raise InvalidArgument("limit", "must be an integer") from None
    if not 1 <= limit <= 100:
        raise InvalidArgument("limit", "must be between 1 and 100")
    after = query.get("after")
    if after:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise InvalidArgument("after", f"'{after}' is not in this list")
        items = items[ids.index(after) + 1:]
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}


async def create_job(request: Request) -> Response:
    state: FrontState = request.app.state.front
    budget = state.authorize(request)
    await state.admission.check_records(request.state.principal, "queued_jobs")
    job_request = await _spec(state, await json_body(request), budget)
    down = state.downstream
    reply = await down.trainer.create_job(job_request, budget)
    return JSONResponse(job_json(reply.job, state.base_model, budget.tenant))


async def list_jobs(request: Request) -> Response:
    state: FrontState = request.app.state.front
    budget = state.authorize(request)
    down = state.downstream
    reply, base = await asyncio.gather(
        down.trainer.list_jobs(pb.ListJobsRequest(), budget),
        state.base_model_name(budget))
    jobs = sorted(reply.jobs, key=lambda j: (j.create_time.seconds, j.create_time.nanos), reverse=True)
    return JSONResponse(_page(request, [job_json(j, base, budget.tenant) for j in jobs]))


async def _get(state: FrontState, request: Request, budget) -> pb.Job:
    down = state.downstream
    reply = await down.trainer.get_job(pb.GetJobRequest(id=_job_id(request)), budget)
    return reply.job


async def get_job(request: Request) -> Response:
    state: FrontState = request.app.state.front
    budget = state.authorize(request)
    job = await _get(state, request, budget)
    return JSONResponse(job_json(job, await state.base_model_name(budget), budget.tenant))


async def cancel_job(request: Request) -> Response:
    state: FrontState = request.app.state.front
    budget = state.authorize(request)
    down = state.downstream
    reply = await down.trainer.cancel_job(pb.CancelJobRequest(id=_job_id(request)), budget)
    return JSONResponse(job_json(reply.job, await state.base_model_name(budget), budget.tenant))


def _event_json(job_id: str, e: pb.JobEvent) -> dict[str, Any]:
    kind = e.WhichOneof("event")
    level, type_, data = "info", "message", None
    if kind == "state_changed":
        status = _STATUS.get(e.state_changed, "queued")
        message = f"Job {status.replace('_', ' ')}"
        level = "error" if e.state_changed == pb.JOB_STATE_FAILED else "info"
    elif kind == "progress":
        p = e.progress
        type_, data = "metrics", {"step": p.step, "total_steps": p.total_steps, "train_loss": p.train_loss,
                                  "learning_rate": p.learning_rate, "epoch": p.epoch}
        message = f"Step {p.step}/{p.total_steps}: training loss={p.train_loss:.4f}"
    elif kind == "epoch_end":
        x = e.epoch_end
        message = f"Epoch {x.epoch} ended: training loss={x.train_loss:.4f}" + (
            f", validation loss={x.validation_loss:.4f}" if x.HasField("validation_loss") else "")
    elif kind == "checkpoint_saved_step":
        message = f"Checkpoint saved at step {e.checkpoint_saved_step}"
    elif kind == "final_metrics":
        m = e.final_metrics
        type_, data = "metrics", {"step": m.steps, "train_loss": m.train_loss, "tokens_per_second": m.tokens_per_second}
        message = f"Training finished after {m.steps} steps: training loss={m.train_loss:.4f}"
    else:
        message = e.message
    return {"id": f"ftevent-{job_id}-{e.sequence}", "object": "fine_tuning.job.event", "created_at": e.time.seconds,
            "level": level, "message": message, "type": type_, "data": data}


async def list_events(request: Request) -> Response:
    state: FrontState = request.app.state.front
    budget = state.authorize(request)
    job = await _get(state, request, budget)
    down = state.downstream
    events = []
    stream = down.trainer.watch_job(pb.WatchJobRequest(id=job.id), budget)
    try:
        while True:
            try:
                # A finished job's stream ends by itself; a running one's pauses once its history is sent.
                item = await asyncio.wait_for(anext(stream), None if job.state in _TERMINAL else _IDLE_S)
            except (StopAsyncIteration, asyncio.TimeoutError):
                break
            events.append(_event_json(job.id, item.event))
    finally:
        await stream.aclose()
    return JSONResponse(_page(request, events[::-1]))  # newest first, as OpenAI lists them


async def list_checkpoints(request: Request) -> Response:
    """The servable adapter a finished job wrote (intermediate training checkpoints are resume points
    for the trainer, not models, so they are not listed)."""
    state: FrontState = request.app.state.front
    budget = state.authorize(request)
    job = await _get(state, request, budget)
    items = []
    model = fine_tuned_model(job)
    if model is not None:
        m = job.metrics
        metrics = {"step": m.steps, "train_loss": m.train_loss}
        if m.HasField("validation_loss"):
            metrics["valid_loss"] = m.validation_loss
        items.append({"id": f"ftckpt-{job.id}-{model.rsplit('/', 1)[1]}", "object": "fine_tuning.job.checkpoint",
                      "created_at": job.update_time.seconds, "fine_tuned_model_checkpoint": model,
                      "fine_tuning_job_id": job.id, "step_number": m.steps or job.step, "metrics": metrics})
    return JSONResponse(_page(request, items))
