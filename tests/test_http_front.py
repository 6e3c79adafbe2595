"""The gateway's OpenAI-compatible HTTP front, driven by the official `openai` client (and plain httpx
for the wire format) against the real gateway, retriever, generator (vLLM) and trainer: chat plain,
streamed, through an adapter and with RAG citations; structured output, logprobs, n; completions;
embeddings; a fine-tuning job from upload to serving; OpenAI-shaped errors; tracing."""

from __future__ import annotations

import json
import time

import grpc
import httpx
import jsonschema
import openai
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.server import GatewayService
from gateway.settings import GatewaySettings
from ragtune.controlplane.api_keys import new_key_entry
from ragtune.models import BASE_MODEL_NAME
from ragtune.v1 import gateway_pb2, gateway_pb2_grpc, retriever_pb2
from services.retriever.server import RetrieverService
from services.retriever.settings import RetrieverSettings
from services.trainer.server import TrainerService
from services.trainer.settings import TrainerSettings
from tests.conftest import GENERATOR_TEST_TENANT, STYLE_MARKER
from tests.grpc_support import InProcessServer
from tests.test_trainer import as_jsonl, jeopardy, prompt_completion

pytestmark = pytest.mark.slow
COLLECTION = "http-facts"
FACTS = [
    ("zorblax", "The Zorblax festival is held every March in the mountain town of Quintara. "
                "Visitors bring copper lanterns and sing until dawn."),
    ("velmora", "Velmora is a small island nation whose national animal is the blue heron. "
                "Its capital city is Ostrel, founded in 1642."),
]
HELLO = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def spans():
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        trace.set_tracer_provider(TracerProvider())
        provider = trace.get_tracer_provider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture(scope="module")
def front(spans, generator_server, style_adapter):
    """(base URL of the HTTP front, API keys by name): the tenant of the `style` adapter, read-only."""
    keys = {"admin": new_key_entry(GENERATOR_TEST_TENANT, ["admin"]),
            "reader": new_key_entry(GENERATOR_TEST_TENANT, ["read"])}
    with InProcessServer(RetrieverService, RetrieverSettings(port=0), "retriever") as retriever, \
            InProcessServer(TrainerService, TrainerSettings(port=0), "trainer") as trainer:
        settings = GatewaySettings(
            port=0, http_port=0, api_keys=json.dumps({"keys": [entry for _, entry in keys.values()]}),
            retriever_address=retriever.address, generator_address=generator_server.address,
            trainer_address=trainer.address,
        )
        with InProcessServer(GatewayService, settings, "gateway") as gateway:
            with grpc.insecure_channel(gateway.address) as channel:
                stub = gateway_pb2_grpc.GatewayServiceStub(channel)
                auth = (("authorization", f"Bearer {keys['admin'][0]}"),)
                stub.CreateCollection(gateway_pb2.GatewayServiceCreateCollectionRequest(
                    request=retriever_pb2.CreateCollectionRequest(collection=retriever_pb2.Collection(name=COLLECTION))),
                    metadata=auth, timeout=60)
                stub.UpsertDocuments(gateway_pb2.GatewayServiceUpsertDocumentsRequest(
                    request=retriever_pb2.UpsertDocumentsRequest(collection=COLLECTION, documents=[
                        retriever_pb2.Document(id=doc_id, text=text) for doc_id, text in FACTS])),
                    metadata=auth, timeout=120)
            yield f"http://127.0.0.1:{gateway.service.http_port}/v1", {name: key for name, (key, _) in keys.items()}


@pytest.fixture(scope="module")
def client(front):
    url, keys = front
    return openai.OpenAI(base_url=url, api_key=keys["admin"], max_retries=0, timeout=300)


def test_models_lists_the_base_model_and_the_tenants_adapters(client):
    ids = {m.id for m in client.models.list()}
    assert {BASE_MODEL_NAME, "style", "style/1"} <= ids, ids
    assert client.models.retrieve("style/1").id == "style/1"


def test_chat_answers_and_streams_the_same_answer(client):
    reply = client.chat.completions.create(model=BASE_MODEL_NAME, messages=HELLO, max_tokens=12, temperature=0)
    text = reply.choices[0].message.content
    assert "paris" in text.lower(), text
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.object == "chat.completion"
    assert reply.usage.completion_tokens > 0 and reply.usage.total_tokens > reply.usage.completion_tokens
    chunks = list(client.chat.completions.create(model=BASE_MODEL_NAME, messages=HELLO, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_chat_through_an_adapter_and_its_version(client):
    question = [{"role": "user", "content": "What do bees make?"}]
    tuned = client.chat.completions.create(model="style", messages=question, max_tokens=10, temperature=0)
    base = client.chat.completions.create(model=BASE_MODEL_NAME, messages=question, max_tokens=10, temperature=0)
    assert STYLE_MARKER.lower() in tuned.choices[0].message.content.lower(), tuned.choices[0].message.content
    assert STYLE_MARKER.lower() not in base.choices[0].message.content.lower()
    assert tuned.model == "style/1" and base.model == BASE_MODEL_NAME


def test_chat_with_rag_cites_the_source(client):
    reply = client.chat.completions.create(
        model=BASE_MODEL_NAME, messages=[{"role": "user", "content": "In which month is the Zorblax festival held?"}],
        max_tokens=32, extra_body={"ragtune": {"collection": COLLECTION, "top_k": 2}})
    assert "march" in reply.choices[0].message.content.lower(), reply.choices[0].message.content
    rag = reply.model_extra["ragtune"]
    assert rag["context"] and rag["context"][0]["document_id"] == "zorblax"
    assert [c["document_id"] for c in rag["citations"]] == ["zorblax"]
    assert reply.choices[0].model_extra["ragtune"]["citations"] == rag["citations"]
    stream = list(client.chat.completions.create(
        model=BASE_MODEL_NAME, messages=[{"role": "user", "content": "What is the capital of Velmora?"}],
        max_tokens=32, stream=True, extra_body={"ragtune": {"collection": COLLECTION}}))
    assert stream[0].choices == [] and stream[0].model_extra["ragtune"]["context"][0]["document_id"] == "velmora"
    assert "ostrel" in "".join(c.choices[0].delta.content or "" for c in stream if c.choices).lower()


def test_a_json_schema_response_parses_and_validates(client):
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
              "required": ["city", "country"], "additionalProperties": False}
    reply = client.chat.completions.create(
        model=BASE_MODEL_NAME, max_tokens=48, temperature=0,
        messages=[{"role": "user", "content": "Give the capital of France and its country as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema}})
    document = json.loads(reply.choices[0].message.content)
    jsonschema.validate(document, schema)


def test_logprobs_and_n_choices(client):
    reply = client.chat.completions.create(model=BASE_MODEL_NAME, messages=HELLO, max_tokens=4, temperature=0,
                                           logprobs=True, top_logprobs=2)
    tokens = reply.choices[0].logprobs.content
    assert tokens and all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in tokens)
    assert "".join(t.token for t in tokens) == reply.choices[0].message.content
    two = client.chat.completions.create(model=BASE_MODEL_NAME, messages=HELLO, max_tokens=6, temperature=1.0, seed=3, n=2)
    assert [c.index for c in two.choices] == [0, 1] and all(c.message.content for c in two.choices)


def test_completions_plain_and_streamed(client):
    reply = client.completions.create(model=BASE_MODEL_NAME, prompt="The capital of France is", max_tokens=6,
                                      temperature=0, stop=["\n"])
    assert reply.choices[0].text.strip() and reply.usage.completion_tokens > 0
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=BASE_MODEL_NAME, prompt="The capital of France is", max_tokens=6, temperature=0, stop=["\n"], stream=True)
        if c.choices)
    assert streamed == reply.choices[0].text


def test_embeddings_come_from_the_retrievers_model(client):
    reply = client.embeddings.create(model="all-MiniLM-L6-v2", input=["a festival in March", "an island nation"])
    assert [d.index for d in reply.data] == [0, 1]
    assert all(len(d.embedding) == 384 for d in reply.data)
    assert abs(sum(x * x for x in reply.data[0].embedding) - 1.0) < 1e-3  # normalized
    assert reply.usage.prompt_tokens > 0


def test_a_fine_tuning_job_is_created_listed_watched_and_its_adapter_serves(client):
    rows = prompt_completion(jeopardy(12, start=820))
    uploaded = client.files.create(file=("http-ft.jsonl", as_jsonl(rows)), purpose="fine-tune")
    assert uploaded.id.startswith("file-") and uploaded.bytes == len(as_jsonl(rows))
    job = client.fine_tuning.jobs.create(
        model=BASE_MODEL_NAME, training_file=uploaded.id, suffix="httpft", hyperparameters={"n_epochs": 1},
        extra_body={"ragtune": {"lora": {"r": 4}, "hyperparameters": {"max_steps": 2, "batch_size": 4,
                                                                      "max_seq_len": 64}}})
    assert job.status in ("queued", "validating_files", "running") and job.training_file == uploaded.id
    assert job.id in [j.id for j in client.fine_tuning.jobs.list(limit=50)]
    deadline = time.monotonic() + 600
    while job.status not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
        time.sleep(2)
        job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job.error
    events = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert "Job succeeded" in events and any(m.startswith("Step ") for m in events), events
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert [c.fine_tuned_model_checkpoint for c in checkpoints] == [job.fine_tuned_model]
    assert job.fine_tuned_model.startswith("httpft/")
    reply = client.chat.completions.create(model=job.fine_tuned_model, messages=HELLO, max_tokens=4)
    assert reply.model == job.fine_tuned_model and reply.choices[0].message.content


def test_errors_have_openais_shape_and_status(front, client):
    url, keys = front
    with pytest.raises(openai.AuthenticationError) as caught:
        openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    assert caught.value.status_code == 401 and caught.value.body["type"] == "authentication_error"
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {keys['admin']}"}, timeout=120) as http:
        for body, param in (({"temperature": "hot"}, "temperature"), ({"frobnicate": 1}, "frobnicate"),
                            ({"temperature": 7.0}, "temperature"), ({"messages": []}, "messages"),
                            ({"response_format": {"type": "yaml"}}, "response_format")):
            reply = http.post("/chat/completions", json={"model": BASE_MODEL_NAME, "messages": HELLO, **body})
            assert reply.status_code == 400, reply.text
            error = reply.json()["error"]
            assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"], error
        missing = http.post("/chat/completions", json={"model": "no-such-adapter", "messages": HELLO, "max_tokens": 2})
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
        assert http.get("/nowhere").json()["error"]["type"] == "not_found_error"
    with pytest.raises(openai.PermissionDeniedError):
        openai.OpenAI(base_url=url, api_key=keys["reader"], max_retries=0).fine_tuning.jobs.create(
            model=BASE_MODEL_NAME, training_file="file-x")


def test_streams_are_server_sent_events_ending_with_done(front):
    url, keys = front
    with httpx.stream("POST", f"{url}/chat/completions", headers={"authorization": f"Bearer {keys['admin']}"},
                      json={"model": BASE_MODEL_NAME, "messages": HELLO, "max_tokens": 4, "stream": True},
                      timeout=120) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        events = [line for line in reply.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events) and events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


def test_one_trace_spans_the_http_request_and_the_generator(client, spans):
    spans.clear()
    # The previous test's stream can end its server span after its client read [DONE]: count only spans begun here.
    began = time.time_ns()
    client.chat.completions.create(model=BASE_MODEL_NAME, messages=HELLO, max_tokens=2)
    deadline = time.monotonic() + 10
    while True:  # the server span ends just after the last byte is sent, so possibly after the client has it
        finished = [s for s in spans.get_finished_spans() if s.start_time >= began]
        server = [s for s in finished if s.name == "POST /v1/chat/completions"]
        if server or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(server) == 1 and server[0].attributes["http.response.status_code"] == 200
    trace_id = server[0].context.trace_id
    assert any("GeneratorService" in s.name and s.context.trace_id == trace_id for s in finished), \
        [s.name for s in finished]


@pytest.fixture(scope="module")
def lonely_front():
    """A gateway whose services are all down (nothing listens at their addresses)."""
    from tests.grpc_support import free_port

    key, entry = new_key_entry("solo", ["read"])
    dead = f"127.0.0.1:{free_port()}"
    settings = GatewaySettings(port=0, http_port=0, api_keys=json.dumps({"keys": [entry]}), retriever_address=dead,
                               generator_address=dead, trainer_address=dead, retry_attempts=1, evaluation_workers=0)
    with InProcessServer(GatewayService, settings, "gateway") as gateway:
        yield f"http://127.0.0.1:{gateway.service.http_port}/v1", key


def test_a_service_down_is_503_a_spent_deadline_504_a_missing_scope_403(lonely_front):
    url, key = lonely_front
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {key}"}, timeout=60) as http:
        down = http.post("/chat/completions", json={"model": "m", "messages": HELLO})
        assert down.status_code == 503 and down.json()["error"]["type"] == "service_unavailable_error", down.text
        assert "generator" in down.json()["error"]["message"]
        late = http.post("/chat/completions", json={"model": "m", "messages": HELLO},
                         headers={"x-request-timeout": "0.000001"})
        assert late.status_code == 504 and late.json()["error"]["type"] == "timeout_error", late.text
        denied = http.post("/fine_tuning/jobs", json={"model": "m", "training_file": "file-x"})
        assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"
        missing_key = httpx.get(f"{url}/models")
        assert missing_key.status_code == 401 and missing_key.json()["error"]["code"] == "invalid_api_key"
