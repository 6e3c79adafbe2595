"""Chat and ChatStream through the real gateway, retriever, generator (vLLM) and trainer: plain chat,
chat through an adapter, several choices with logprobs, multi-turn RAG whose last question only makes
sense with the earlier turns (the search query names what it refers to), and bad input named."""

from __future__ import annotations

import json

import grpc
import pytest

from gateway.server import GatewayService
from gateway.settings import GatewaySettings
from ragtune.controlplane.api_keys import new_key_entry
from ragtune.errors import bad_request_violations
from ragtune.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, retriever_pb2
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
# Turn 2 of each only makes sense with turn 1.
VELMORA = [("user", "What is the national animal of Velmora?"),
           ("assistant", "The national animal of Velmora is the blue heron."),
           ("user", "What is its capital?")]
ZORBLAX = [("user", "In which month is the Zorblax festival held?"),
           ("assistant", "The Zorblax festival is held every March."),
           ("user", "Where is it held?")]


@pytest.fixture(scope="module")
def suite(generator_server, style_adapter):
    keys = {
        "acme": new_key_entry("acme", ["read", "ingest"]),
        "styled": new_key_entry(GENERATOR_TEST_TENANT, ["read"]),
        "trainer": new_key_entry("acme", ["train"]),
    }
    with InProcessServer(RetrieverService, RetrieverSettings(port=0), "retriever") as retriever, \
            InProcessServer(TrainerService, TrainerSettings(port=0), "trainer") as trainer:
        settings = GatewaySettings(
            port=0, api_keys=json.dumps({"keys": [entry for _, entry in keys.values()]}),
            retriever_address=retriever.address, generator_address=generator_server.address,
            trainer_address=trainer.address,
        )
        with InProcessServer(GatewayService, settings, "gateway") as gateway:
            channel = grpc.insecure_channel(gateway.address)
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            auth = {name: (("authorization", f"Bearer {key}"),) for name, (key, _) in keys.items()}
            stub.CreateCollection(gateway_pb2.GatewayServiceCreateCollectionRequest(
                request=retriever_pb2.CreateCollectionRequest(collection=retriever_pb2.Collection(name="chat-facts"))),
                metadata=auth["acme"], timeout=60)
            stub.UpsertDocuments(gateway_pb2.GatewayServiceUpsertDocumentsRequest(
                request=retriever_pb2.UpsertDocumentsRequest(collection="chat-facts", documents=[
                    retriever_pb2.Document(id=doc_id, text=text) for doc_id, text in FACTS])),
                metadata=auth["acme"], timeout=120)
            yield stub, auth
            channel.close()


def _conversation(turns, max_tokens: int = 24, retrieval: bool = False, **kw) -> gateway_pb2.ChatConversation:
    c = gateway_pb2.ChatConversation(messages=[common_pb2.ChatMessage(role=r, content=t) for r, t in turns], **kw)
    c.sampling.max_tokens = max_tokens
    if retrieval:
        c.retrieval.collection = "chat-facts"
    return c


def test_plain_chat_answers_and_streams_the_same_answer(suite):
    stub, auth = suite
    c = _conversation([("user", "What is the capital of France?")], max_tokens=12)
    c.sampling.temperature = 0.0
    reply = stub.Chat(gateway_pb2.ChatRequest(conversation=c), metadata=auth["acme"], timeout=120)
    assert len(reply.choices) == 1 and reply.choices[0].index == 0
    assert "paris" in reply.choices[0].content.lower(), reply.choices[0].content
    assert reply.choices[0].finish_reason in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)
    assert not reply.context and not reply.search_query and not reply.choices[0].citations
    assert reply.usage.prompt_tokens > 0 and 0 < reply.usage.completion_tokens <= 12
    assert reply.timing.retrieval_ms == 0 and reply.timing.generation_ms > 0

    events = list(stub.ChatStream(gateway_pb2.ChatStreamRequest(conversation=c), metadata=auth["acme"], timeout=120))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"delta"} and len(kinds) > 2
    assert "".join(e.delta.content for e in events[:-1]) == reply.choices[0].content  # greedy: the same answer
    assert [ch.index for ch in events[-1].done.choices] == [0]
    assert events[-1].done.usage.completion_tokens == reply.usage.completion_tokens


def test_chat_through_an_adapter(suite):
    stub, auth = suite
    c = _conversation([("user", "What do bees make?")], max_tokens=12, adapter="style")
    reply = stub.Chat(gateway_pb2.ChatRequest(conversation=c), metadata=auth["styled"], timeout=120)
    assert reply.choices[0].content.strip().startswith(STYLE_MARKER), reply.choices[0].content
    assert reply.adapter.startswith("style/")


def test_chat_with_several_choices_and_logprobs(suite):
    stub, auth = suite
    c = _conversation([("user", "Name a color.")], max_tokens=6)
    c.sampling.n = 2
    c.sampling.temperature = 1.0
    c.sampling.seed = 7
    c.sampling.logprobs = True
    reply = stub.Chat(gateway_pb2.ChatRequest(conversation=c), metadata=auth["acme"], timeout=120)
    assert [ch.index for ch in reply.choices] == [0, 1]
    for choice in reply.choices:
        assert choice.content and choice.finish_reason
        assert 0 < len(choice.logprobs) <= 6 and all(lp.logprob <= 0 for lp in choice.logprobs)
        assert "".join(lp.token for lp in choice.logprobs).strip() == choice.content.strip()
    assert reply.usage.completion_tokens == sum(len(ch.logprobs) for ch in reply.choices)
    events = list(stub.ChatStream(gateway_pb2.ChatStreamRequest(conversation=c), metadata=auth["acme"], timeout=120))
    assert {e.delta.index for e in events if e.WhichOneof("event") == "delta"} == {0, 1}


def test_multi_turn_rag_searches_with_a_standalone_question(suite):
    stub, auth = suite
    reply = stub.Chat(gateway_pb2.ChatRequest(conversation=_conversation(VELMORA, retrieval=True)),
                      metadata=auth["acme"], timeout=120)
    assert reply.search_query != "What is its capital?" and "Velmora" in reply.search_query, reply.search_query
    assert reply.context and reply.context[0].document_id == "velmora"
    answer = reply.choices[0]
    assert "ostrel" in answer.content.lower(), answer.content
    assert {c.document_id for c in answer.citations} == {"velmora"}
    assert reply.timing.retrieval_ms > 0 and reply.usage.completion_tokens > 0


def test_multi_turn_rag_streams_the_query_and_context_first(suite):
    stub, auth = suite
    events = list(stub.ChatStream(gateway_pb2.ChatStreamRequest(conversation=_conversation(ZORBLAX, retrieval=True)),
                                  metadata=auth["acme"], timeout=120))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "context" and kinds[-1] == "done" and set(kinds[1:-1]) == {"delta"}
    context = events[0].context
    assert "Zorblax" in context.search_query and context.search_query != "Where is it held?"
    assert context.context[0].document_id == "zorblax"
    answer = "".join(e.delta.content for e in events[1:-1])
    assert "quintara" in answer.lower(), answer
    assert {c.document_id for c in events[-1].done.choices[0].citations} == {"zorblax"}


def test_no_rewrite_and_a_first_turn_search_with_the_message_as_written(suite):
    stub, auth = suite
    c = _conversation(VELMORA, max_tokens=4, retrieval=True)
    c.retrieval.no_rewrite = True
    reply = stub.Chat(gateway_pb2.ChatRequest(conversation=c), metadata=auth["acme"], timeout=120)
    assert reply.search_query == "What is its capital?"
    first = _conversation([("user", "Who invented the Kettering process?")], max_tokens=40, retrieval=True)
    reply = stub.Chat(gateway_pb2.ChatRequest(conversation=first), metadata=auth["acme"], timeout=120)
    assert reply.search_query == "Who invented the Kettering process?"
    assert {c.document_id for c in reply.choices[0].citations} == {"kettering"}


def test_chat_says_so_when_nothing_retrieved_is_about_the_question(suite):
    stub, auth = suite
    c = _conversation([("user", "What is the capital city of Tarsk?")], retrieval=True)
    c.sampling.n = 2
    c.sampling.temperature = 0.7  # several choices need sampling (the default with retrieval is greedy)
    reply = stub.Chat(gateway_pb2.ChatRequest(conversation=c), metadata=auth["acme"], timeout=120)
    assert [ch.content for ch in reply.choices] == ["The documents do not say."] * 2
    assert not reply.context and not any(ch.citations for ch in reply.choices)


def _violations(stub, auth, conversation) -> set[str]:
    with pytest.raises(grpc.RpcError) as err:
        stub.Chat(gateway_pb2.ChatRequest(conversation=conversation), metadata=auth, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    return {v.field for v in bad_request_violations(err.value)}


def test_bad_conversations_are_named(suite):
    stub, auth = suite
    assert _violations(stub, auth["acme"], gateway_pb2.ChatConversation()) == {"conversation.messages"}
    c = _conversation([("robot", "Hi"), ("user", " "), ("assistant", "Hello")])
    assert _violations(stub, auth["acme"], c) == {
        "conversation.messages[0].role", "conversation.messages[1].content", "conversation.messages[2].role"}
    c = _conversation([("user", "Hi")], retrieval=True)
    c.retrieval.collection = ""
    c.retrieval.top_k = 99
    c.retrieval.alpha = 2.0
    assert _violations(stub, auth["acme"], c) == {
        "conversation.retrieval.collection", "conversation.retrieval.top_k", "conversation.retrieval.alpha"}
    c = _conversation([("user", "x" * 9000)], retrieval=True)
    assert _violations(stub, auth["acme"], c) == {"conversation.messages[0].content"}


def test_chat_needs_the_read_scope_and_a_known_collection(suite):
    stub, auth = suite
    with pytest.raises(grpc.RpcError) as err:
        stub.Chat(gateway_pb2.ChatRequest(conversation=_conversation([("user", "Hi")])),
                  metadata=auth["trainer"], timeout=30)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    c = _conversation([("user", "Hi")], retrieval=True)
    c.retrieval.collection = "missing"
    with pytest.raises(grpc.RpcError) as err:
        stub.Chat(gateway_pb2.ChatRequest(conversation=c), metadata=auth["acme"], timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


# --- the standalone query and the answer prompt, without services ---------------------------------

def test_a_rewrite_is_used_only_when_it_is_grounded_and_standalone():
    from gateway.chat_rewrite import FALLBACK, MODEL, judge_rewrite

    zorblax = [tuple(t) for t in ZORBLAX]
    assert judge_rewrite(zorblax, " Where is the Zorblax festival held?\n", True).source == MODEL
    # An invented name, an unchanged question that still leans on the conversation, a run-on, an empty one:
    for text, finished in (("What is the capital of Bulgaria?", True), ("What is its capital?", True),
                           ("What is the capital of Velmora? " * 9, False), ("", True)):
        query = judge_rewrite(VELMORA, text, finished)
        assert query == type(query)("What is its capital? (Velmora)", FALLBACK), text
    # A last message that names its own subject is searched as written when the rewrite is unusable.
    own = [*VELMORA[:2], ("user", "Who invented the Kettering process?")]
    assert judge_rewrite(own, "Who invented the Tour de France?", True).text == "Who invented the Kettering process?"
    assert judge_rewrite(own, "Who invented the Kettering process?", True).source == MODEL


def test_the_rewrite_prompt_ends_with_the_conversation():
    from gateway.chat_rewrite import rewrite_prompt

    prompt = rewrite_prompt(VELMORA)
    assert prompt.endswith("User: What is the national animal of Velmora?\nAssistant: The national animal of Velmora"
                           " is the blue heron.\nUser: What is its capital?\nStandalone question:")
    long_turn = [("user", "word " * 400), ("assistant", "ok"), ("user", "And then?")]
    assert len(rewrite_prompt(long_turn)) < len(rewrite_prompt(VELMORA)) + 400


def test_the_answer_prompt_drops_the_oldest_turns_to_fit():
    from gateway.chat import ChatPipeline
    from gateway.prompting import ContextPassage
    from gateway.rag import TokenCounter
    from ragtune.models import base_model_dir

    chat = ChatPipeline(None, None, TokenCounter(base_model_dir()))
    turns = [("system", "Answer briefly.")]
    for i in range(6):
        turns += [("user", f"Question {i}: " + "tell me more " * 20), ("assistant", f"Answer {i}. " + "yes " * 20)]
    turns.append(("user", "What is its capital?"))
    messages = [common_pb2.ChatMessage(role=r, content=t) for r, t in turns]
    passage = ContextPassage(1, "c1", "velmora", 0, 1.0, FACTS[1][1])
    whole = chat._answer_messages(messages, "What is its capital? (Velmora)", [passage], 4000)
    assert len(whole) == 14 and whole[0].role == "system" and "Answer briefly." in whole[0].content
    assert whole[-1].content.endswith("Question: What is its capital? (Velmora)") and "Ostrel" in whole[-1].content
    trimmed = chat._answer_messages(messages, "What is its capital? (Velmora)", [passage], 400)
    assert 2 < len(trimmed) < len(whole) and trimmed[-1] == whole[-1] and trimmed[0] == whole[0]
    assert trimmed[1:-1] == whole[len(whole) - len(trimmed) + 1:-1]  # the latest turns kept, in order
    counter = TokenCounter(base_model_dir())
    assert counter.messages([{"role": m.role, "content": m.content} for m in trimmed]) <= 400
