"""End to end through the real gateway and the real retriever, generator (vLLM) and trainer:
cited answers, RAG with an adapter, auth and cross-tenant refusals, deadline propagation, and
one trace spanning gateway -> retriever -> generator."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ragtune.controlplane.api_keys import new_key_entry
from gateway.server import GatewayService
from gateway.settings import GatewaySettings
from ragtune.v1 import gateway_pb2, gateway_pb2_grpc, retriever_pb2, trainer_pb2
from services.retriever.server import RetrieverService
from services.retriever.settings import RetrieverSettings
from services.trainer.server import TrainerService
from services.trainer.settings import TrainerSettings
from tests.conftest import GENERATOR_TEST_TENANT, STYLE_MARKER
from tests.grpc_support import InProcessServer

FACTS = [
    ("zorblax", "The Zorblax festival is held every March in the mountain town of Quintara. "
                "Visitors bring copper lanterns and sing until dawn."),
    ("velmora", "Velmora is a small island nation whose national animal is the blue heron. "
                "Its capital city is Ostrel, founded in 1642."),
    ("kettering", "The Kettering process turns seaweed into a durable plastic. "
                  "It was invented by Ada Kettering, a chemist from Leeds."),
]


@pytest.fixture(scope="module")
def spans():
    """An in-memory exporter on the process's tracer provider (all servers here run in-process)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
        provider = trace.get_tracer_provider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture(scope="module")
def suite(spans, generator_server, style_adapter):
    keys = {
        "acme": new_key_entry("acme", ["admin"]),
        "reader": new_key_entry("acme", ["read"]),
        "rival": new_key_entry("rival", ["admin"]),
        "styled": new_key_entry(GENERATOR_TEST_TENANT, ["admin"]),
    }
    with InProcessServer(RetrieverService, RetrieverSettings(port=0), "retriever") as retriever, \
            InProcessServer(TrainerService, TrainerSettings(port=0), "trainer") as trainer:
        settings = GatewaySettings(
            port=0,
            api_keys=json.dumps({"keys": [entry for _, entry in keys.values()]}),
            retriever_address=retriever.address,
            generator_address=generator_server.address,
            trainer_address=trainer.address,
        )
        with InProcessServer(GatewayService, settings, "gateway") as gateway:
            channel = grpc.insecure_channel(gateway.address)
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            auth = {name: (("authorization", f"Bearer {key}"),) for name, (key, _) in keys.items()}
            for tenant in ("acme", "styled"):
                stub.CreateCollection(gateway_pb2.GatewayServiceCreateCollectionRequest(
                    request=retriever_pb2.CreateCollectionRequest(collection=retriever_pb2.Collection(name="facts"))),
                    metadata=auth[tenant], timeout=60)
                stub.UpsertDocuments(gateway_pb2.GatewayServiceUpsertDocumentsRequest(
                    request=retriever_pb2.UpsertDocumentsRequest(collection="facts", documents=[
                        retriever_pb2.Document(id=doc_id, text=text) for doc_id, text in FACTS])),
                    metadata=auth[tenant], timeout=120)
            yield stub, auth
            channel.close()


def _question(text: str, **kw) -> gateway_pb2.AskQuestion:
    q = gateway_pb2.AskQuestion(question=text, collection="facts", **kw)
    q.sampling.max_tokens = 48
    return q


def test_ask_answers_from_the_collection_and_cites_the_source(suite):
    stub, auth = suite
    reply = stub.Ask(gateway_pb2.AskRequest(question=_question("In which month is the Zorblax festival held?")),
                     metadata=auth["acme"], timeout=120)
    assert "march" in reply.answer.lower(), reply.answer
    assert reply.context and reply.context[0].document_id == "zorblax"
    assert [c.number for c in reply.context] == list(range(1, len(reply.context) + 1))
    assert reply.citations, f"no citation for {reply.answer!r}"
    # Attributed by the sentence holding the answer's facts: the source, and nothing else.
    assert {c.document_id for c in reply.citations} == {"zorblax"}
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 0
    t = reply.timing
    assert t.retrieval_ms > 0 and t.generation_ms > 0 and t.total_ms >= t.retrieval_ms + t.generation_ms


def test_ask_says_so_when_nothing_retrieved_is_about_the_question(suite):
    stub, auth = suite
    reply = stub.Ask(gateway_pb2.AskRequest(question=_question("What is the capital city of Tarsk?")),
                     metadata=auth["acme"], timeout=120)
    assert reply.answer == "The documents do not say."
    assert not reply.citations and not reply.context


def test_ask_stream_sends_context_then_deltas_then_done(suite):
    stub, auth = suite
    kinds = [e.WhichOneof("event") for e in stub.AskStream(
        gateway_pb2.AskStreamRequest(question=_question("What is the capital of Velmora?")),
        metadata=auth["acme"], timeout=120)]
    assert kinds[0] == "context" and kinds[-1] == "done"
    assert set(kinds[1:-1]) == {"delta"} and len(kinds) > 3


def test_rag_with_an_adapter_uses_the_adapter(suite):
    stub, auth = suite
    q = _question("Who invented the Kettering process?", adapter="style")
    reply = stub.Ask(gateway_pb2.AskRequest(question=q), metadata=auth["styled"], timeout=120)
    base = stub.Ask(gateway_pb2.AskRequest(question=_question("Who invented the Kettering process?")),
                    metadata=auth["styled"], timeout=120)
    assert reply.context[0].document_id == "kettering"
    assert reply.answer != base.answer
    assert STYLE_MARKER.lower() in reply.answer.lower() and STYLE_MARKER.lower() not in base.answer.lower()


def test_no_retrieval_mode_sends_no_context(suite):
    stub, auth = suite
    q = gateway_pb2.AskQuestion(question="Say hello.", no_retrieval=True)
    q.sampling.max_tokens = 8
    reply = stub.Ask(gateway_pb2.AskRequest(question=q), metadata=auth["acme"], timeout=120)
    assert reply.answer and not reply.context and not reply.citations and reply.timing.retrieval_ms == 0


def test_a_tenant_never_reaches_another_tenants_data(suite):
    stub, auth = suite
    with pytest.raises(grpc.RpcError) as err:
        stub.Ask(gateway_pb2.AskRequest(question=_question("Zorblax?")), metadata=auth["rival"], timeout=60)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    listed = stub.ListCollections(gateway_pb2.GatewayServiceListCollectionsRequest(
        request=retriever_pb2.ListCollectionsRequest()), metadata=auth["rival"], timeout=30).response
    assert [c.name for c in listed.collections] == []
    with pytest.raises(grpc.RpcError) as err:
        stub.DeleteCollection(gateway_pb2.GatewayServiceDeleteCollectionRequest(
            request=retriever_pb2.DeleteCollectionRequest(name="facts")), metadata=auth["rival"], timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # The style adapter belongs to another tenant: acme cannot use it.
    with pytest.raises(grpc.RpcError) as err:
        stub.Ask(gateway_pb2.AskRequest(question=_question("Hi", adapter="style")), metadata=auth["acme"], timeout=60)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    jobs = stub.ListJobs(gateway_pb2.GatewayServiceListJobsRequest(request=trainer_pb2.ListJobsRequest()),
                         metadata=auth["rival"], timeout=30).response
    assert list(jobs.jobs) == []


def test_read_scope_cannot_ingest_or_train(suite):
    stub, auth = suite
    with pytest.raises(grpc.RpcError) as err:
        stub.UpsertDocuments(gateway_pb2.GatewayServiceUpsertDocumentsRequest(
            request=retriever_pb2.UpsertDocumentsRequest(collection="facts", documents=[
                retriever_pb2.Document(id="x", text="y")])), metadata=auth["reader"], timeout=30)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateJob(gateway_pb2.GatewayServiceCreateJobRequest(request=trainer_pb2.CreateJobRequest()),
                       metadata=auth["reader"], timeout=30)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_downstream_bad_input_is_passed_on_with_its_field(suite):
    stub, auth = suite
    q = _question("Anything?")
    q.sampling.temperature = 5.0
    with pytest.raises(grpc.RpcError) as err:
        stub.Ask(gateway_pb2.AskRequest(question=q), metadata=auth["acme"], timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "temperature" in err.value.details()


def test_the_client_deadline_reaches_the_generator(suite, generator_server):
    stub, auth = suite
    q = _question("Write a very long story about the Zorblax festival.")
    q.sampling.max_tokens = 1500
    q.sampling.temperature = 0.0
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        for _ in stub.AskStream(gateway_pb2.AskStreamRequest(question=q), metadata=auth["acme"], timeout=3):
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 30
    engine = generator_server.service.engine
    for _ in range(50):  # the abort reaches the engine asynchronously
        if engine.unfinished_requests() == 0:
            break
        time.sleep(0.2)
    assert engine.unfinished_requests() == 0


def test_one_trace_spans_gateway_retriever_and_generator(suite, spans):
    stub, auth = suite
    spans.clear()
    # The previous test's aborted stream may end its spans after this point: count only spans begun here.
    began = time.time_ns()
    stub.Ask(gateway_pb2.AskRequest(question=_question("What is the national animal of Velmora?")),
             metadata=auth["acme"], timeout=120)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        finished = [s for s in spans.get_finished_spans() if s.start_time >= began]
        names = {s.name for s in finished}
        if "/ragtune.v1.GatewayService/Ask" in names and "/ragtune.v1.GeneratorService/GenerateStream" in names:
            break
        time.sleep(0.1)
    server_spans = {s.name: s for s in finished if s.kind == trace.SpanKind.SERVER}
    root = server_spans["/ragtune.v1.GatewayService/Ask"]
    search = server_spans["/ragtune.v1.RetrieverService/Search"]
    generate = server_spans["/ragtune.v1.GeneratorService/GenerateStream"]
    trace_id = root.context.trace_id
    assert search.context.trace_id == trace_id and generate.context.trace_id == trace_id
    by_id = {s.context.span_id: s for s in finished}

    def ancestors(span):
        chain = []
        while span.parent is not None and span.parent.span_id in by_id:
            span = by_id[span.parent.span_id]
            chain.append(span)
        return chain

    assert root in ancestors(search) and root in ancestors(generate)
    # The gateway's client spans sit between its server span and each service's server span.
    assert any(s.kind == trace.SpanKind.CLIENT for s in ancestors(search))
    assert any(s.kind == trace.SpanKind.CLIENT for s in ancestors(generate))


# --- evaluation --------------------------------------------------------------------------------

EVAL_SET = "\n".join(json.dumps(item) for item in [
    {"id": "z", "question": "In which month is the Zorblax festival held?", "answers": ["March"],
     "gold_document_ids": ["zorblax"]},
    {"id": "v", "question": "What is the capital city of Velmora?", "answers": ["Ostrel"],
     "gold_document_ids": ["velmora"]},
    {"id": "k", "question": "Who invented the Kettering process?", "answers": ["Ada Kettering"],
     "gold_document_ids": ["kettering"]},
]).encode()


def _evaluate(stub, auth, spec: gateway_pb2.EvaluationSpec) -> gateway_pb2.GetEvaluationResponse:
    created = stub.CreateEvaluation(gateway_pb2.CreateEvaluationRequest(spec=spec), metadata=auth, timeout=60)
    snapshots = [u.evaluation for u in stub.WatchEvaluation(
        gateway_pb2.WatchEvaluationRequest(id=created.evaluation.id), metadata=auth, timeout=600)]
    assert snapshots[-1].state != gateway_pb2.EVALUATION_STATE_RUNNING
    done = [s.answers_done for s in snapshots]
    assert done == sorted(done), "progress never goes back"
    return stub.GetEvaluation(gateway_pb2.GetEvaluationRequest(id=created.evaluation.id, include_report=True),
                              metadata=auth, timeout=60)


def test_a_small_evaluation_runs_end_to_end(suite):
    from gateway.evaluation.metrics import token_f1

    stub, auth = suite
    spec = gateway_pb2.EvaluationSpec(eval_set=EVAL_SET, collection="facts", top_k=2,
                                      arms=[gateway_pb2.EVALUATION_ARM_BASE, gateway_pb2.EVALUATION_ARM_RAG])
    spec.sampling.max_tokens = 24
    reply = _evaluate(stub, auth["acme"], spec)
    e = reply.evaluation
    assert e.state == gateway_pb2.EVALUATION_STATE_SUCCEEDED, e.error
    assert (e.questions, e.answers_done, e.answers_total) == (3, 6, 6)
    arms = {a.arm: a for a in e.arms}
    base, rag = arms[gateway_pb2.EVALUATION_ARM_BASE], arms[gateway_pb2.EVALUATION_ARM_RAG]
    assert not base.failed and not rag.failed
    assert rag.recall_at_k == 1.0 and rag.mrr == 1.0  # each question's own fact ranks first
    assert not base.HasField("recall_at_k")  # no retrieval, no retrieval metrics
    # The facts are invented: only the retrieval arm can know them.
    assert rag.token_f1.mean > base.token_f1.mean
    assert rag.token_f1.ci_low <= rag.token_f1.mean <= rag.token_f1.ci_high
    assert e.recommended_arm in ("base", "rag") and e.reasons
    # The kept per-question results agree with the metric recomputed from the stored answers.
    results = json.loads(reply.results_json)
    assert results == json.loads((Path(e.report_folder) / "results.json").read_text())
    for arm in results["arms"]:
        for q in arm["questions"]:
            assert q["token_f1"] == pytest.approx(token_f1(q["answer"], q["references"]))
    assert "rag" in reply.report_markdown and "src=\"data:image/png;base64," in reply.report_html


def test_evaluation_bad_input(suite, style_adapter):
    stub, auth = suite
    bad = b'{"question": "ok?", "answers": ["yes"]}\nnot json\n{"question": "", "answers": ["x"]}\n'
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateEvaluation(gateway_pb2.CreateEvaluationRequest(spec=gateway_pb2.EvaluationSpec(
            eval_set=bad, collection="facts")), metadata=auth["acme"], timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "line 2" in err.value.details() and "line 3" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateEvaluation(gateway_pb2.CreateEvaluationRequest(spec=gateway_pb2.EvaluationSpec(
            eval_set=EVAL_SET, collection="nope")), metadata=auth["acme"], timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateEvaluation(gateway_pb2.CreateEvaluationRequest(spec=gateway_pb2.EvaluationSpec(
            eval_set=EVAL_SET, collection="facts", adapter="missing")), metadata=auth["acme"], timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_an_arm_that_fails_is_reported_failed(suite, style_adapter):
    """An adapter the registry holds but the generator refuses (rank above its limit): the fine-tuned
    arm fails with the generator's reason, the base arm still runs, and the report says so."""
    from ragtune.registry import AdapterRegistry
    from ragtune.settings import ServiceSettings

    stub, auth = suite
    registry = AdapterRegistry(ServiceSettings().registry_root)
    meta = {**style_adapter.metadata, "rank": 64}
    for key in ("tenant", "name", "version"):
        meta.pop(key, None)
    config = json.loads((style_adapter.path / "adapter_config.json").read_text())
    with tempfile.TemporaryDirectory() as folder:
        shutil.copytree(style_adapter.path, folder, dirs_exist_ok=True)
        config["r"] = 64
        (Path(folder) / "adapter_config.json").write_text(json.dumps(config))
        registry.publish("acme", "too-big", Path(folder), meta)
    spec = gateway_pb2.EvaluationSpec(eval_set=EVAL_SET, adapter="too-big",
                                      arms=[gateway_pb2.EVALUATION_ARM_BASE, gateway_pb2.EVALUATION_ARM_FINETUNED])
    spec.sampling.max_tokens = 8
    reply = _evaluate(stub, auth["acme"], spec)
    arms = {a.arm: a for a in reply.evaluation.arms}
    assert not arms[gateway_pb2.EVALUATION_ARM_BASE].failed
    tuned = arms[gateway_pb2.EVALUATION_ARM_FINETUNED]
    assert tuned.failed and "rank" in tuned.error
    assert "FAILED" in reply.report_markdown
