"""Generation controls through the real gRPC server and the real vLLM engine: several completions (n),
log probabilities, presence/frequency penalties, structured output (JSON schema, regex, choice) and
the INVALID_ARGUMENT answers for each of them."""

from __future__ import annotations

import json
import re
import time

import grpc
import jsonschema
import pytest

from ragtune.errors import bad_request_violations
from ragtune.tenancy import tenant_metadata
from ragtune.v1 import common_pb2, generator_pb2, generator_pb2_grpc
from tests.conftest import GENERATOR_TEST_TENANT

pytestmark = pytest.mark.slow  # one vLLM engine for the session

MD = tenant_metadata(GENERATOR_TEST_TENANT)
UNSET = common_pb2.FINISH_REASON_UNSPECIFIED
STOP = common_pb2.FINISH_REASON_STOP
LENGTH = common_pb2.FINISH_REASON_LENGTH
COUNTING = "Count from 1 to 500, separated by commas: 1, 2, 3, 4, 5,"


def prompt(text: str) -> generator_pb2.GenerationInput:
    return generator_pb2.GenerationInput(prompt=text)


def ask(question: str) -> generator_pb2.GenerationInput:
    return generator_pb2.GenerationInput(
        chat=generator_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content=question)])
    )


def sampled(max_tokens: int = 6, **more) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=1.0, seed=11, max_tokens=max_tokens, **more)


def greedy(max_tokens: int, **more) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, **more)


@pytest.fixture(scope="module")
def stub(generator_server):
    with grpc.insecure_channel(generator_server.address) as channel:
        yield generator_pb2_grpc.GeneratorServiceStub(channel)


def engine_idle(server, timeout: float = 20.0) -> bool:
    """No request left in vLLM and no admission slot held (polled: the slots come back as the call ends)."""

    async def probe():
        return server.service.engine.unfinished_requests(), server.service.generator.in_flight

    deadline = time.monotonic() + timeout
    while server.call(probe()) != (0, 0):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def generate(stub, input_, sampling) -> generator_pb2.GenerateResponse:
    return stub.Generate(generator_pb2.GenerateRequest(input=input_, sampling=sampling), metadata=MD, timeout=120)


def stream(stub, input_, sampling) -> list[generator_pb2.GenerateStreamResponse]:
    request = generator_pb2.GenerateStreamRequest(input=input_, sampling=sampling)
    return list(stub.GenerateStream(request, metadata=MD, timeout=120))


# --- n: several completions -------------------------------------------------------------------------

def test_n_returns_every_choice_in_index_order_with_usage_summed(stub, generator_server):
    reply = generate(stub, prompt("Once upon a time"), sampled(n=2, logprobs=True))
    assert [c.index for c in reply.choices] == [0, 1]
    assert all(c.text and c.finish_reason in (STOP, LENGTH) for c in reply.choices)
    assert (reply.text, reply.finish_reason) == (reply.choices[0].text, reply.choices[0].finish_reason)
    # One logprob per generated token: their count over both choices is the usage.
    assert reply.usage.completion_tokens == sum(len(c.logprobs) for c in reply.choices) > 0
    assert reply.usage.prompt_tokens > 0
    assert engine_idle(generator_server)


def test_stream_with_n_interleaves_choices_ends_each_and_matches_unary(stub, generator_server):
    sampling = sampled(n=2, logprobs=True)
    messages = stream(stub, prompt("Once upon a time"), sampling)
    texts, finishes, tokens = {0: "", 1: ""}, {}, 0
    for message in messages:
        assert message.index in (0, 1)
        assert message.index not in finishes, "a choice sent more after its finish message"
        texts[message.index] += message.delta
        tokens += len(message.logprobs)
        if message.finish_reason != UNSET:
            finishes[message.index] = message.finish_reason
    assert set(finishes) == {0, 1}
    # usage and adapter ride on the last message only, and the last message ends a choice.
    assert messages[-1].finish_reason != UNSET
    assert messages[-1].usage.completion_tokens == tokens > 0
    assert all(not m.HasField("usage") for m in messages[:-1])
    # The same seeds give the same choices as the unary call.
    unary = generate(stub, prompt("Once upon a time"), sampling)
    assert [c.text for c in unary.choices] == [texts[0], texts[1]]
    assert engine_idle(generator_server)


def test_stream_with_one_choice_keeps_the_single_final_message_shape(stub):
    messages = stream(stub, prompt(COUNTING), greedy(6, logprobs=True))
    assert all(m.index == 0 for m in messages)
    assert [m.finish_reason != UNSET for m in messages] == [False] * (len(messages) - 1) + [True]
    assert [m.HasField("usage") for m in messages] == [False] * (len(messages) - 1) + [True]
    for message in messages:  # each delta carries the log probabilities of exactly its tokens
        assert "".join(t.token for t in message.logprobs) == message.delta
    assert messages[-1].usage.completion_tokens == sum(len(m.logprobs) for m in messages) == 6


def test_each_completion_counts_against_the_admission_limit(stub, generator_server):
    """vLLM runs each of n completions as a sequence: a request with n = k holds k admission slots."""
    limit = generator_server.service.settings.max_in_flight
    max_n = generator_server.service.settings.max_n
    server = generator_server

    async def in_flight():
        return server.service.generator.in_flight

    server.call(server.service.engine.pause())
    try:
        held = [
            stub.GenerateStream(
                generator_pb2.GenerateStreamRequest(input=prompt(f"Say {i}"), sampling=sampled(1, n=max_n)),
                metadata=MD,
            )
            for i in range(limit // max_n)
        ]
        deadline = time.monotonic() + 20
        while server.call(in_flight()) != limit // max_n * max_n and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.call(in_flight()) == limit // max_n * max_n
        # One completion more than the slots left is refused at once, though it is one request.
        left = limit - limit // max_n * max_n
        with pytest.raises(grpc.RpcError) as caught:
            generate(stub, prompt("Hi"), sampled(1, n=left + 1))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        server.call(server.service.engine.resume())
    for call in held:  # once the engine runs again every held request ends every choice
        messages = list(call)
        assert {m.index for m in messages if m.finish_reason != UNSET} == set(range(max_n))
    assert engine_idle(generator_server)


# --- log probabilities -------------------------------------------------------------------------------

def test_logprobs_give_each_token_and_its_most_likely_alternatives(stub):
    reply = generate(stub, prompt(COUNTING), greedy(8, logprobs=True, top_logprobs=3))
    choice = reply.choices[0]
    assert choice.finish_reason == LENGTH
    assert len(choice.logprobs) == reply.usage.completion_tokens == 8
    assert "".join(t.token for t in choice.logprobs) == choice.text
    for token in choice.logprobs:
        assert token.logprob <= 0
        assert len(token.top_logprobs) == 3
        alternatives = [top.logprob for top in token.top_logprobs]
        assert all(lp <= 0 for lp in alternatives) and alternatives == sorted(alternatives, reverse=True)
        # Greedy decoding picks the most likely token.
        assert token.token == token.top_logprobs[0].token
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob, abs=1e-4)


def test_logprobs_without_top_logprobs_and_none_unless_asked(stub):
    with_logprobs = generate(stub, prompt(COUNTING), greedy(4, logprobs=True)).choices[0]
    assert len(with_logprobs.logprobs) == 4 and all(not t.top_logprobs for t in with_logprobs.logprobs)
    assert not generate(stub, prompt(COUNTING), greedy(4)).choices[0].logprobs


# --- penalties -----------------------------------------------------------------------------------------

def test_presence_and_frequency_penalties_are_applied(stub):
    plain = generate(stub, prompt(COUNTING), greedy(12))
    penalized = generate(stub, prompt(COUNTING), greedy(12, presence_penalty=2.0, frequency_penalty=2.0))
    assert plain.finish_reason == penalized.finish_reason == LENGTH
    assert penalized.text and penalized.text != plain.text  # repeated commas and digits get penalized
    negative = generate(stub, prompt(COUNTING), greedy(4, presence_penalty=-1.5, frequency_penalty=-0.5))
    assert negative.text


# --- structured output ---------------------------------------------------------------------------------

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_json_schema_output_parses_and_validates(stub):
    structured = common_pb2.StructuredOutput(json_schema=json.dumps(PERSON))
    reply = generate(stub, ask("Describe a person as JSON."), greedy(50, structured_output=structured))
    assert reply.finish_reason == STOP, reply.text
    document = json.loads(reply.text)
    jsonschema.validate(document, PERSON)


def test_regex_output_matches_fully(stub):
    pattern = r"\d{4}-\d{2}-\d{2}"
    structured = common_pb2.StructuredOutput(regex=pattern)
    reply = generate(stub, ask("When did the first moon landing happen?"), greedy(20, structured_output=structured))
    assert re.fullmatch(pattern, reply.text), reply.text


def test_choice_output_is_one_of_the_choices_in_stream_and_unary(stub):
    choices = ["yes", "no", "maybe"]
    structured = common_pb2.StructuredOutput(choice=common_pb2.Choices(choices=choices))
    sampling = greedy(10, structured_output=structured)
    assert generate(stub, ask("Is the sky blue?"), sampling).text in choices
    assert "".join(m.delta for m in stream(stub, ask("Is the sky blue?"), sampling)) in choices


def test_json_object_output_is_an_object(stub):
    structured = common_pb2.StructuredOutput(json_object=True)
    reply = generate(stub, ask("Describe a cat as JSON."), greedy(8, structured_output=structured))
    assert reply.text.lstrip().startswith("{"), reply.text


# --- bad input -------------------------------------------------------------------------------------------

def so(**kind) -> common_pb2.StructuredOutput:
    return common_pb2.StructuredOutput(**kind)


SO = "sampling.structured_output"
BAD_CONTROLS = [
    ("n-zero", dict(n=0), "sampling.n"),
    ("n-above-max", dict(n=99), "sampling.n"),
    ("n-with-greedy-decoding", dict(n=2, temperature=0.0), "sampling.n"),
    ("top-logprobs-without-logprobs", dict(top_logprobs=2), "sampling.top_logprobs"),
    ("top-logprobs-too-many", dict(logprobs=True, top_logprobs=50), "sampling.top_logprobs"),
    ("presence-penalty-high", dict(presence_penalty=3.0), "sampling.presence_penalty"),
    ("frequency-penalty-low", dict(frequency_penalty=-3.0), "sampling.frequency_penalty"),
    ("json-schema-not-json", dict(structured_output=so(json_schema="not json")), f"{SO}.json_schema"),
    ("json-schema-not-object", dict(structured_output=so(json_schema="[1, 2]")), f"{SO}.json_schema"),
    ("json-schema-bad-type", dict(structured_output=so(json_schema='{"type": "strin"}')), f"{SO}.json_schema"),
    ("regex-unbalanced", dict(structured_output=so(regex="(")), f"{SO}.regex"),
    # Python compiles a look-ahead; vLLM's grammar compiler refuses it: still the client's mistake, named.
    ("regex-lookahead", dict(structured_output=so(regex="(?=a)b")), f"{SO}.regex"),
    ("choice-empty", dict(structured_output=so(choice=common_pb2.Choices())), f"{SO}.choice.choices"),
    ("choice-empty-string", dict(structured_output=so(choice=common_pb2.Choices(choices=["a", ""]))),
     f"{SO}.choice.choices[1]"),
    ("json-object-false", dict(structured_output=so(json_object=False)), f"{SO}.json_object"),
    ("structured-output-empty", dict(structured_output=so()), SO),
]


@pytest.mark.parametrize("case,fields,field", BAD_CONTROLS, ids=[c[0] for c in BAD_CONTROLS])
@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
def test_bad_controls_are_invalid_argument_naming_the_field(stub, generator_server, rpc, case, fields, field):
    sampling = common_pb2.SamplingParams(max_tokens=2, **fields)
    with pytest.raises(grpc.RpcError) as caught:
        if rpc == "Generate":
            generate(stub, prompt("Hi"), sampling)
        else:
            stream(stub, prompt("Hi"), sampling)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert field in [v.field for v in bad_request_violations(caught.value)], caught.value.details()
    assert engine_idle(generator_server)


def test_every_control_mistake_is_reported_at_once(stub):
    sampling = common_pb2.SamplingParams(
        n=0, top_logprobs=2, presence_penalty=9, structured_output=so(regex="("), max_tokens=2
    )
    with pytest.raises(grpc.RpcError) as caught:
        generate(stub, prompt("Hi"), sampling)
    assert {v.field for v in bad_request_violations(caught.value)} == {
        "sampling.n", "sampling.top_logprobs", "sampling.presence_penalty", "sampling.structured_output.regex",
    }
