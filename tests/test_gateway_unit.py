"""Gateway pieces that need no other service: prompt assembly, citations, API keys, and the
gateway's own answers (auth refusals, bad input, a dependency down) over a real socket."""

from __future__ import annotations

import json
import time

import grpc
import pytest

from gateway.auth import KeyRing, Scope
from ragtune.controlplane.api_keys import hash_key, new_key_entry, parse_key_entries
from gateway.prompting import (
    ContextPassage,
    build_messages,
    cited_numbers,
    fit_passages,
    inferred_citations,
    prompt_skeleton_tokens,
)
from gateway.server import GatewayService
from gateway.settings import GatewaySettings
from ragtune.errors import PermissionDenied, Unauthenticated, bad_request_violations
from ragtune.v1 import gateway_pb2, gateway_pb2_grpc, retriever_pb2
from tests.grpc_support import InProcessServer, free_port


def _passage(n: int, text: str, doc: str = "doc") -> ContextPassage:
    return ContextPassage(n, f"{doc}#{n - 1}", doc, n - 1, 1.0 / n, text)


def test_prompt_marks_context_as_untrusted_and_numbers_it():
    messages = build_messages("Who wrote it?", [_passage(1, "Alpha text."), _passage(2, "Beta text.")])
    assert messages[0]["role"] == "system" and "untrusted" in messages[0]["content"]
    user = messages[1]["content"]
    assert "[1] (document: doc)\n<<<\nAlpha text.\n>>>" in user
    assert user.index("[1]") < user.index("[2]") < user.index("Question: Who wrote it?")


def test_prompt_without_passages_is_the_plain_question():
    assert build_messages("Hi?", []) == [{"role": "user", "content": "Hi?"}]


def test_fit_passages_keeps_a_rank_prefix_within_the_budget():
    words = lambda text: len(text.split())  # noqa: E731 - a stand-in tokenizer: one token per word
    count_messages = lambda msgs: sum(words(m["content"]) for m in msgs)  # noqa: E731
    count_texts = lambda texts: [words(t) for t in texts]  # noqa: E731
    skeleton = prompt_skeleton_tokens(count_messages, words)
    passages = [_passage(i, " ".join(["w"] * 50)) for i in range(1, 6)]
    # The skeleton plus the question and the first two passages, as counted whole, fit; a third does not.
    two = count_messages(build_messages("q", passages[:2]))
    kept = fit_passages("q", passages, count_texts, skeleton, two + 10)
    assert [p.number for p in kept] == [1, 2]
    assert fit_passages("q", passages, count_texts, skeleton, 10_000) == passages
    assert fit_passages("q", passages, count_texts, skeleton, 5) == []
    # Never more than the whole prompt would really take, slack included.
    for kept_n in range(1, 6):
        budget = count_messages(build_messages("q", passages[:kept_n])) + 2 * (kept_n + 1)
        assert len(fit_passages("q", passages, count_texts, skeleton, budget)) == kept_n


def test_cited_numbers_in_order_of_first_use_and_in_range():
    assert cited_numbers("A [2], B [1][2], C [9], D [0]", available=3) == [2, 1]
    assert cited_numbers("no marks", available=3) == []


def test_inferred_citations_need_real_word_overlap():
    passages = [_passage(1, "Paris is the capital of France."), _passage(2, "Berlin is in Germany.")]
    assert inferred_citations("The capital of France is Paris.", passages) == [1]
    assert inferred_citations("I do not know.", passages) == []


def test_api_keys_are_hashed_and_scoped():
    key, entry = new_key_entry("acme", ["read"])
    assert key not in json.dumps(entry) and entry["sha256"] == hash_key(key)
    store = KeyRing(parse_key_entries(json.dumps({"keys": [entry]})))
    principal = store.authenticate([("authorization", f"Bearer {key}")])
    assert principal.tenant == "acme"
    principal.require(Scope.READ)
    with pytest.raises(PermissionDenied, match="train"):
        principal.require(Scope.TRAIN)
    with pytest.raises(Unauthenticated, match="invalid"):
        store.authenticate([("authorization", "Bearer rt_wrong")])
    with pytest.raises(Unauthenticated, match="missing"):
        store.authenticate([])
    with pytest.raises(Unauthenticated, match="Bearer"):
        store.authenticate([("authorization", f"Basic {key}")])


def test_api_keys_file_rejects_bad_entries():
    with pytest.raises(ValueError, match="tenant"):
        parse_key_entries(json.dumps({"keys": [{"sha256": "0" * 64, "tenant": "Bad Tenant", "scopes": []}]}))
    with pytest.raises(ValueError, match="scopes"):
        parse_key_entries(json.dumps({"keys": [{"sha256": "0" * 64, "tenant": "t", "scopes": ["root"]}]}))
    with pytest.raises(ValueError, match="sha256"):
        parse_key_entries(json.dumps({"keys": [{"sha256": "z" * 64, "tenant": "t", "scopes": []}]}))


@pytest.fixture(scope="module")
def lone_gateway():
    """A gateway whose downstream services are all down (nothing listens on their ports)."""
    read_key, read_entry = new_key_entry("acme", ["read"])
    admin_key, admin_entry = new_key_entry("acme", ["admin"])
    dead = f"127.0.0.1:{free_port()}"
    settings = GatewaySettings(
        port=0, api_keys=json.dumps({"keys": [read_entry, admin_entry]}),
        retriever_address=dead, generator_address=dead, trainer_address=dead,
    )
    with InProcessServer(GatewayService, settings, "gateway") as server:
        channel = grpc.insecure_channel(server.address)
        yield gateway_pb2_grpc.GatewayServiceStub(channel), read_key, admin_key
        channel.close()


def _auth(key: str):
    return (("authorization", f"Bearer {key}"),)


def test_gateway_refuses_missing_and_invalid_keys(lone_gateway):
    stub, _, _ = lone_gateway
    request = gateway_pb2.GatewayServiceListCollectionsRequest(request=retriever_pb2.ListCollectionsRequest())
    with pytest.raises(grpc.RpcError) as err:
        stub.ListCollections(request, timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        stub.ListCollections(request, metadata=_auth("rt_nope"), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_gateway_refuses_a_missing_scope(lone_gateway):
    stub, read_key, _ = lone_gateway
    request = gateway_pb2.GatewayServiceCreateCollectionRequest(
        request=retriever_pb2.CreateCollectionRequest(collection=retriever_pb2.Collection(name="c"))
    )
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateCollection(request, metadata=_auth(read_key), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "ingest" in err.value.details()


def test_ask_validates_before_calling_anything(lone_gateway):
    stub, read_key, _ = lone_gateway
    q = gateway_pb2.AskQuestion(question=" ", top_k=500)
    q.alpha = 1.5
    with pytest.raises(grpc.RpcError) as err:
        stub.Ask(gateway_pb2.AskRequest(question=q), metadata=_auth(read_key), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = {v.field for v in bad_request_violations(err.value)}
    assert fields == {"question.question", "question.collection", "question.top_k", "question.alpha"}


def test_a_down_dependency_answers_unavailable_quickly(lone_gateway):
    stub, read_key, _ = lone_gateway
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        stub.ListCollections(
            gateway_pb2.GatewayServiceListCollectionsRequest(request=retriever_pb2.ListCollectionsRequest()),
            metadata=_auth(read_key), timeout=20,
        )
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "retriever" in err.value.details()
    assert time.monotonic() - started < 10, "a down dependency must not hang the request"
