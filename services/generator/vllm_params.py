"""Maps validated sampling to vLLM's SamplingParams and vLLM's outputs back to chunks with log probabilities."""

from __future__ import annotations

from typing import Iterator

from ragtune.errors import InvalidArgument
from services.generator.domain import TokenLogprob, TopLogprob
from services.generator.domain import Chunk, Sampling


def tenant_cache_salt(tenant: str) -> str:
    """The prefix-cache salt of a tenant's requests. vLLM reuses cached KV blocks only between requests with the
    same salt, so one tenant can never hit (and time) blocks another tenant's prompt left in the cache."""
    return "tenant:" + tenant


def engine_prompt(prompt_token_ids: list[int], cache_salt: str | None) -> dict:
    """vLLM's TokensPrompt for one request, salted where a salt is given."""
    prompt: dict = {"prompt_token_ids": prompt_token_ids}
    if cache_salt is not None:
        prompt["cache_salt"] = cache_salt
    return prompt


def vllm_sampling_params(sampling: Sampling):
    """vLLM's parameters for one request, streaming deltas (RequestOutputKind.DELTA)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        max_tokens=sampling.max_tokens,
        stop=list(sampling.stop) or None,
        seed=sampling.seed,
        repetition_penalty=sampling.repetition_penalty,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        # vLLM returns the sampled token's log probability plus this many most likely ones at each position.
        logprobs=sampling.logprobs,
        structured_outputs=_structured_outputs(sampling),
        output_kind=RequestOutputKind.DELTA,
    )


def _structured_outputs(sampling: Sampling):
    constraint = sampling.structured_output
    if constraint is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if constraint.json_schema is not None:
        return StructuredOutputsParams(json=constraint.json_schema)
    if constraint.regex is not None:
        return StructuredOutputsParams(regex=constraint.regex)
    if constraint.choice is not None:
        return StructuredOutputsParams(choice=list(constraint.choice))
    return StructuredOutputsParams(json_object=True)


def chunks_of(output, sampling: Sampling) -> Iterator[Chunk]:
    """One chunk per choice present in a vLLM RequestOutput (DELTA kind: each holds only the new tokens).
    A choice's finish_reason is its own: with n > 1 vLLM marks the output finished only when all are."""
    for completion in output.outputs:
        token_ids = list(completion.token_ids)
        logprobs = ()
        if sampling.logprobs is not None:
            logprobs = _token_logprobs(token_ids, completion.logprobs, sampling.logprobs)
        yield Chunk(completion.text, len(token_ids), completion.finish_reason, completion.index, logprobs)


def _token_logprobs(token_ids: list[int], positions, top: int) -> tuple[TokenLogprob, ...]:
    """vLLM gives, per generated token, {token_id: Logprob(logprob, rank, decoded_token)} holding the sampled
    token and the `top` most likely (one entry when the sampled token is among them); ranks start at 1."""
    result = []
    for token_id, position in zip(token_ids, positions or ()):
        sampled = position.get(token_id)
        ranked = sorted((entry for entry in position.values() if entry.rank is not None and entry.rank <= top),
                        key=lambda entry: entry.rank)
        result.append(
            TokenLogprob(
                token=_text(sampled),
                logprob=_finite(sampled.logprob if sampled is not None else float("-inf")),
                top_logprobs=tuple(TopLogprob(_text(entry), _finite(entry.logprob)) for entry in ranked[:top]),
            )
        )
    return tuple(result)


def _text(entry) -> str:
    return (entry.decoded_token or "") if entry is not None else ""


def _finite(logprob: float) -> float:
    # A token masked out (a structured-output constraint, top_k) has -inf; clients get the lowest float instead
    # of an infinity that JSON cannot carry.
    return max(float(logprob), -3.4e38)


def engine_rejection(exc: BaseException, sampling: Sampling) -> InvalidArgument | None:
    """The client's mistake vLLM found while admitting the request (its own request checks), named by field;
    None for anything else (a server fault)."""
    from vllm.exceptions import VLLMClientError

    # vLLM's structured-output checks raise VLLMValidationError, some ValueError (a NUL in a regex).
    if not isinstance(exc, (VLLMClientError, ValueError)):
        return None
    reason = str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__
    if sampling.structured_output is not None:
        kinds = sampling.structured_output.kinds()
        field = f"sampling.structured_output.{kinds[0]}" if kinds else "sampling.structured_output"
        return InvalidArgument(field, f"the engine cannot use it: {reason}")
    if isinstance(exc, VLLMClientError):
        parameter = getattr(exc, "parameter", None)
        return InvalidArgument(f"sampling.{parameter}" if parameter else "sampling", reason)
    return None
