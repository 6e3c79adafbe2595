"""Generator through its real gRPC server and the real vLLM engine: generation, streaming, sampling,
bad input, cancellation, deadlines and backpressure."""

from __future__ import annotations

import concurrent.futures
import math
import time

import grpc
import pytest

from ragtune.errors import bad_request_violations
from ragtune.models import BASE_MODEL_NAME
from ragtune.tenancy import tenant_metadata
from ragtune.v1 import common_pb2, generator_pb2, generator_pb2_grpc
from tests.conftest import GENERATOR_TEST_TENANT

pytestmark = pytest.mark.slow  # one vLLM engine for the session, a trained adapter

MD = tenant_metadata(GENERATOR_TEST_TENANT)
# A prompt the model keeps continuing: cancellation tests need a request that is still running.
COUNTING = "Count from 1 to 500, separated by commas: 1, 2, 3, 4, 5,"


def chat(*turns: tuple[str, str]) -> generator_pb2.GenerationInput:
    return generator_pb2.GenerationInput(
        chat=generator_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in turns])
    )


def prompt(text: str) -> generator_pb2.GenerationInput:
    return generator_pb2.GenerationInput(prompt=text)


def greedy(max_tokens: int = 32, **more) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, **more)


@pytest.fixture(scope="module")
def stub(generator_server):
    with grpc.insecure_channel(generator_server.address) as channel:
        yield generator_pb2_grpc.GeneratorServiceStub(channel)


def wait_until(check, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


def engine_idle(server) -> bool:
    """No request left in vLLM and no admission slot held."""

    async def probe():
        return server.service.engine.unfinished_requests(), server.service.generator.in_flight

    return server.call(probe()) == (0, 0)


class paused_engine:
    """Holds every request queued in the engine (vLLM's pause "keep") so tests control timing exactly."""

    def __init__(self, server):
        self.server = server

    def __enter__(self):
        self.server.call(self.server.service.engine.pause())
        return self

    def __exit__(self, *exc):
        self.server.call(self.server.service.engine.resume())


def test_generate_answers_a_chat_question(stub):
    reply = stub.Generate(
        generator_pb2.GenerateRequest(input=chat(("user", "What is the capital of France?")), sampling=greedy()),
        metadata=MD,
    )
    assert "Paris" in reply.text
    assert reply.finish_reason == common_pb2.FINISH_REASON_STOP
    assert reply.usage.prompt_tokens > 10  # the chat template's system turn is counted too
    assert 0 < reply.usage.completion_tokens <= 32


def test_raw_prompt_stops_at_max_tokens(stub):
    reply = stub.Generate(
        generator_pb2.GenerateRequest(input=prompt(COUNTING), sampling=greedy(max_tokens=5)), metadata=MD
    )
    assert reply.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert reply.usage.completion_tokens == 5
    assert reply.text.strip().startswith("6")


def test_stream_yields_deltas_then_one_final_message_matching_unary(stub):
    request = dict(input=chat(("user", "Name three colors.")), sampling=greedy(max_tokens=24))
    messages = list(stub.GenerateStream(generator_pb2.GenerateStreamRequest(**request), metadata=MD))
    unary = stub.Generate(generator_pb2.GenerateRequest(**request), metadata=MD)
    assert len(messages) > 2
    assert all(m.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for m in messages[:-1])
    assert not any(m.HasField("usage") for m in messages[:-1])
    final = messages[-1]
    assert final.finish_reason in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)
    assert final.usage == unary.usage
    assert "".join(m.delta for m in messages) == unary.text


def test_stop_string_ends_generation_without_returning_it(stub):
    request = generator_pb2.GenerateRequest(
        input=chat(("user", "What is the capital of France?")), sampling=greedy(stop=["Paris"])
    )
    reply = stub.Generate(request, metadata=MD)
    assert reply.finish_reason == common_pb2.FINISH_REASON_STOP
    assert "Paris" not in reply.text
    assert reply.text.startswith("The capital of France is")


def test_seed_makes_sampling_reproducible(stub):
    def sample(seed: int) -> str:
        sampling = common_pb2.SamplingParams(temperature=1.5, top_p=0.95, top_k=50, max_tokens=24, seed=seed)
        return stub.Generate(
            generator_pb2.GenerateRequest(input=prompt("Once upon a time"), sampling=sampling), metadata=MD
        ).text

    first = sample(7)
    assert sample(7) == first
    assert any(sample(seed) != first for seed in (8, 9, 10))


def test_model_info_describes_the_served_model(stub):
    info = stub.GetModelInfo(generator_pb2.GetModelInfoRequest(), metadata=MD)
    assert info.base_model == BASE_MODEL_NAME
    assert info.max_context_tokens == 2048
    assert info.max_lora_rank == 16
    assert info.max_loras == 2


LONG_PROMPT = "word " * 2100

BAD_REQUESTS = [
    (
        "temperature-high",
        dict(input=prompt("Hi"), sampling=common_pb2.SamplingParams(temperature=2.5)),
        "sampling.temperature",
    ),
    (
        "temperature-negative",
        dict(input=prompt("Hi"), sampling=common_pb2.SamplingParams(temperature=-0.1)),
        "sampling.temperature",
    ),
    (
        "temperature-nan",
        dict(input=prompt("Hi"), sampling=common_pb2.SamplingParams(temperature=math.nan)),
        "sampling.temperature",
    ),
    (
        "temperature-inf",
        dict(input=prompt("Hi"), sampling=common_pb2.SamplingParams(temperature=math.inf)),
        "sampling.temperature",
    ),
    ("top-p-zero", dict(input=prompt("Hi"), sampling=common_pb2.SamplingParams(top_p=0.0)), "sampling.top_p"),
    ("top-p-above-one", dict(input=prompt("Hi"), sampling=common_pb2.SamplingParams(top_p=1.5)), "sampling.top_p"),
    (
        "max-tokens-zero",
        dict(input=prompt("Hi"), sampling=common_pb2.SamplingParams(max_tokens=0)),
        "sampling.max_tokens",
    ),
    ("top-k-negative", dict(input=prompt("Hi"), sampling=common_pb2.SamplingParams(top_k=-1)), "sampling.top_k"),
    (
        "repetition-penalty-zero",
        dict(input=prompt("Hi"), sampling=common_pb2.SamplingParams(repetition_penalty=0)),
        "sampling.repetition_penalty",
    ),
    ("empty-stop-string", dict(input=prompt("Hi"), sampling=common_pb2.SamplingParams(stop=[""])), "sampling.stop[0]"),
    ("no-input", dict(), "input"),
    ("empty-prompt", dict(input=prompt("")), "input.prompt"),
    (
        "no-messages",
        dict(input=generator_pb2.GenerationInput(chat=generator_pb2.ChatMessages())),
        "input.chat.messages",
    ),
    ("unknown-role", dict(input=chat(("user", "Hi"), ("wizard", "Hi"))), "input.chat.messages[1].role"),
    ("prompt-too-long", dict(input=prompt(LONG_PROMPT)), "input.prompt"),
    ("chat-too-long", dict(input=chat(("user", LONG_PROMPT))), "input.chat.messages"),
    ("max-tokens-beyond-context", dict(input=prompt("Hi"), sampling=greedy(max_tokens=2048)), "sampling.max_tokens"),
    ("adapter-dotdot", dict(input=prompt("Hi"), adapter="../other/style"), "adapter"),
    ("adapter-absolute", dict(input=prompt("Hi"), adapter="/etc/passwd"), "adapter"),
]


@pytest.mark.parametrize("case,fields,field", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream"])
def test_bad_input_is_invalid_argument_naming_the_field(stub, generator_server, rpc, case, fields, field):
    with pytest.raises(grpc.RpcError) as caught:
        if rpc == "Generate":
            stub.Generate(generator_pb2.GenerateRequest(**fields), metadata=MD, timeout=60)
        else:
            list(stub.GenerateStream(generator_pb2.GenerateStreamRequest(**fields), metadata=MD, timeout=60))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert field in [v.field for v in bad_request_violations(caught.value)]
    assert engine_idle(generator_server)


def test_every_sampling_mistake_is_reported_at_once(stub):
    sampling = common_pb2.SamplingParams(temperature=3, top_p=2, max_tokens=0)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(generator_pb2.GenerateRequest(input=prompt("Hi"), sampling=sampling), metadata=MD)
    fields = {v.field for v in bad_request_violations(caught.value)}
    assert fields == {"sampling.temperature", "sampling.top_p", "sampling.max_tokens"}


def test_unknown_adapter_is_not_found(stub, generator_server):
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(generator_pb2.GenerateRequest(input=prompt("Hi"), adapter="no-such-adapter"), metadata=MD)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "adapter" in caught.value.details()
    assert engine_idle(generator_server)


def test_missing_tenant_is_unauthenticated(stub):
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(generator_pb2.GenerateRequest(input=prompt("Hi")))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_cancelling_a_stream_aborts_the_engine_request(stub, generator_server):
    call = stub.GenerateStream(
        generator_pb2.GenerateStreamRequest(input=prompt(COUNTING), sampling=greedy(max_tokens=1500)), metadata=MD
    )
    for _, message in zip(range(3), call, strict=False):
        assert message.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED
    assert generator_server.call(_unfinished(generator_server)) == 1
    call.cancel()
    assert wait_until(lambda: engine_idle(generator_server)), "the engine still holds the cancelled request"
    # The service keeps serving afterwards.
    assert (
        stub.Generate(
            generator_pb2.GenerateRequest(input=prompt("Hi"), sampling=greedy(3)), metadata=MD
        ).usage.completion_tokens
        > 0
    )


async def _unfinished(server) -> int:
    return server.service.engine.unfinished_requests()


def test_deadline_passing_aborts_the_engine_request(stub, generator_server):
    with paused_engine(generator_server):
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(
                generator_pb2.GenerateRequest(input=prompt(COUNTING), sampling=greedy(max_tokens=100)),
                metadata=MD,
                timeout=1.5,
            )
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert wait_until(lambda: engine_idle(generator_server)), "the engine still holds the timed-out request"


def test_beyond_the_waiting_limit_requests_are_refused_at_once(stub, generator_server):
    limit = generator_server.service.settings.max_in_flight
    with paused_engine(generator_server):
        held = [
            stub.GenerateStream(
                generator_pb2.GenerateStreamRequest(input=prompt(f"Say {i}"), sampling=greedy(max_tokens=2)),
                metadata=MD,
            )
            for i in range(limit)
        ]
        in_flight = lambda: generator_server.call(_in_flight(generator_server))  # noqa: E731
        assert wait_until(lambda: in_flight() == limit)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(generator_pb2.GenerateRequest(input=prompt("Hi")), metadata=MD, timeout=30)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Once the engine runs again the held requests all finish normally.
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        finals = list(pool.map(lambda call: list(call)[-1], held))
    assert all(f.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED for f in finals)
    assert all(f.usage.completion_tokens >= 1 for f in finals)
    assert wait_until(lambda: engine_idle(generator_server))


async def _in_flight(server) -> int:
    return server.service.generator.in_flight
