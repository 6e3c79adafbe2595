"""Maps the generator's protobuf messages to the core's dataclasses (domain.py) and its results back."""

from __future__ import annotations

from ragtune.v1 import common_pb2, generator_pb2
from services.generator.domain import (
    ChatTurn,
    ChoiceResult,
    GenerationInput,
    SamplingRequest,
    StructuredOutput,
)
from services.generator.domain import Chunk

FINISH = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
}


def generation_input(message: generator_pb2.GenerationInput) -> GenerationInput:
    kind = message.WhichOneof("input")
    if kind == "prompt":
        return GenerationInput(prompt=message.prompt)
    if kind == "chat":
        return GenerationInput(chat=tuple(ChatTurn(m.role, m.content) for m in message.chat.messages))
    return GenerationInput()


def _optional(message, name: str):
    return getattr(message, name) if message.HasField(name) else None


def sampling_request(message: common_pb2.SamplingParams) -> SamplingRequest:
    return SamplingRequest(
        temperature=_optional(message, "temperature"),
        top_p=_optional(message, "top_p"),
        top_k=_optional(message, "top_k"),
        max_tokens=_optional(message, "max_tokens"),
        stop=tuple(message.stop),
        seed=_optional(message, "seed"),
        repetition_penalty=_optional(message, "repetition_penalty"),
        n=_optional(message, "n"),
        logprobs=message.logprobs,
        top_logprobs=_optional(message, "top_logprobs"),
        presence_penalty=_optional(message, "presence_penalty"),
        frequency_penalty=_optional(message, "frequency_penalty"),
        structured_output=(
            structured_output(message.structured_output) if message.HasField("structured_output") else None
        ),
    )


def structured_output(message: common_pb2.StructuredOutput) -> StructuredOutput:
    kind = message.WhichOneof("kind")
    if kind == "json_schema":
        return StructuredOutput(json_schema=message.json_schema)
    if kind == "regex":
        return StructuredOutput(regex=message.regex)
    if kind == "choice":
        return StructuredOutput(choice=tuple(message.choice.choices))
    if kind == "json_object":
        return StructuredOutput(json_object=message.json_object)
    return StructuredOutput()  # set but empty: the core reports it


def token_logprobs(logprobs) -> list[common_pb2.TokenLogprob]:
    return [
        common_pb2.TokenLogprob(
            token=entry.token,
            logprob=entry.logprob,
            top_logprobs=[common_pb2.TopLogprob(token=top.token, logprob=top.logprob) for top in entry.top_logprobs],
        )
        for entry in logprobs
    ]


def usage(prompt_tokens: int, completion_tokens: int) -> common_pb2.TokenUsage:
    return common_pb2.TokenUsage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)


def generate_response(
    choices: list[ChoiceResult], prompt_tokens: int, completion_tokens: int, adapter: str
) -> generator_pb2.GenerateResponse:
    """The unary answer: every choice in index order; text and finish_reason repeat the first."""
    first = choices[0]
    return generator_pb2.GenerateResponse(
        text=first.text,
        finish_reason=FINISH.get(first.finish_reason, 0),
        usage=usage(prompt_tokens, completion_tokens),
        adapter=adapter,
        choices=[
            generator_pb2.GenerationChoice(
                index=choice.index,
                text=choice.text,
                finish_reason=FINISH.get(choice.finish_reason, 0),
                logprobs=token_logprobs(choice.logprobs),
            )
            for choice in choices
        ],
    )


def stream_message(chunk: Chunk) -> generator_pb2.GenerateStreamResponse:
    """A delta of the choice `chunk.index`, ending it when the chunk carries its finish reason."""
    return generator_pb2.GenerateStreamResponse(
        delta=chunk.text,
        index=chunk.index,
        finish_reason=FINISH.get(chunk.finish_reason, 0),
        logprobs=token_logprobs(chunk.logprobs),
    )

