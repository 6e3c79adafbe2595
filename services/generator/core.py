"""One generation from request to finish: validation, admission (backpressure), prompt rendering,
adapter acquisition, the engine stream, and the release of all of it however the request ends."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

from ragtune.errors import FieldViolation, InvalidArgument, ResourceExhausted
from ragtune.registry import parse_served_ref
from services.generator.adapters import AdapterCatalog, CatalogEntry
from services.generator.aliases import AliasResolver
from services.generator.domain import ChoiceResult, GenerationInput, SamplingRequest
from services.generator.domain import Chunk, Sampling
from services.generator.engine import GenerationEngine
from services.generator.prompts import PromptRenderer
from services.generator.sampling import parse_sampling
from services.generator.vllm_params import tenant_cache_salt


class GenerationStream:
    """A request admitted and submitted: iterate `chunks()` (or await `collect()`); `close()` (idempotent)
    aborts it in the engine if it is still running and gives back its admission slots and adapter.

    With sampling.n > 1 the chunks of the choices interleave, each naming its `index`; the request is
    finished once every choice has its finish_reason."""

    def __init__(
        self,
        generator: "Generator",
        request_id: str,
        prompt_ids: list[int],
        sampling: Sampling,
        adapter: CatalogEntry | None,
        cache_salt: str | None = None,
    ):
        self._generator = generator
        self.cache_salt = cache_salt  # the tenant's: no prefix-cache blocks shared across tenants
        self.request_id = request_id
        self._prompt_ids = prompt_ids
        self.sampling = sampling
        self.adapter = adapter
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0  # summed over the choices
        self.finish_reasons: dict[int, str] = {}  # choice index -> its finish reason, once it has one
        # vLLM runs each choice as a sequence of its own: admission counts sequences, not requests.
        self.slots = sampling.n
        self._closed = False

    @property
    def finish_reason(self) -> str | None:
        """The first choice's finish reason (None while it runs)."""
        return self.finish_reasons.get(0)

    @property
    def finished(self) -> bool:
        """Every choice has ended."""
        return len(self.finish_reasons) >= self.sampling.n

    async def chunks(self) -> AsyncIterator[Chunk]:
        engine = self._generator.engine
        lora = self.adapter.handle if self.adapter else None
        try:
            async for chunk in engine.generate(self.request_id, self._prompt_ids, self.sampling, lora,
                                               cache_salt=self.cache_salt):
                self.completion_tokens += chunk.tokens
                if chunk.finish_reason is not None:
                    self.finish_reasons[chunk.index] = chunk.finish_reason
                yield chunk
        finally:
            await self.close()

    async def collect(self) -> list[ChoiceResult]:
        """Runs the request to its end: every choice whole, in index order."""
        choices = [ChoiceResult(index) for index in range(self.sampling.n)]
        parts: list[list[str]] = [[] for _ in choices]
        async for chunk in self.chunks():
            choice = choices[chunk.index]
            parts[chunk.index].append(chunk.text)
            choice.tokens += chunk.tokens
            choice.logprobs.extend(chunk.logprobs)
            choice.finish_reason = chunk.finish_reason or choice.finish_reason
        for choice, texts in zip(choices, parts):
            choice.text = "".join(texts)
        return choices

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if not self.finished:
                await self._generator.engine.abort(self.request_id)
        finally:
            await self._generator.release(self)


class Generator:
    """The generator's core: no gRPC here, errors are ragtune.errors exceptions."""

    def __init__(
        self,
        engine: GenerationEngine,
        renderer: PromptRenderer,
        catalog: AdapterCatalog,
        aliases: AliasResolver | None = None,
        *,
        max_in_flight: int,
        default_temperature: float,
        default_max_tokens: int,
        max_n: int = 8,
    ):
        self.engine = engine
        self.renderer = renderer
        self.catalog = catalog
        self.aliases = aliases
        self.max_in_flight = max_in_flight
        self.default_temperature = default_temperature
        self.default_max_tokens = default_max_tokens
        self.max_n = max_n
        self.in_flight = 0  # admitted sequences (a request with sampling.n = k holds k)
        # One thread renders prompts: the tokenizer is not guaranteed thread-safe, and rendering is fast.
        self._render_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prompt-render")

    def _validate(
        self, request_input: GenerationInput, sampling_request: SamplingRequest, adapter_ref: str
    ) -> Sampling:
        bad: list[FieldViolation] = list(self.renderer.check(request_input))
        sampling, sampling_bad = parse_sampling(
            sampling_request, default_temperature=self.default_temperature, max_n=self.max_n
        )
        bad.extend(sampling_bad)
        if adapter_ref:
            try:
                _, _, alias = parse_served_ref(adapter_ref, "adapter")
                if alias and self.aliases is None:
                    raise InvalidArgument("adapter", "aliases need the control plane (RAGTUNE_DATABASE_URL)")
            except InvalidArgument as exc:
                bad.extend(exc.violations)
        if bad:
            raise InvalidArgument.of(bad)
        return sampling

    def _fit_to_context(self, prompt_ids: list[int], prompt_field: str, sampling: Sampling) -> Sampling:
        context = self.engine.max_model_len
        n = len(prompt_ids)
        if n >= context:
            raise InvalidArgument(prompt_field, f"the prompt is {n} tokens; the context window is {context} tokens")
        room = context - n
        if sampling.max_tokens == 0:
            return dataclasses.replace(sampling, max_tokens=min(self.default_max_tokens, room))
        if sampling.max_tokens > room:
            raise InvalidArgument(
                "sampling.max_tokens",
                f"{sampling.max_tokens} tokens do not fit: the prompt is {n} tokens of a {context}-token "
                f"context window (at most {room} left)",
            )
        return sampling

    async def open(
        self,
        tenant: str,
        request_input: GenerationInput,
        sampling_request: SamplingRequest,
        adapter_ref: str,
    ) -> GenerationStream:
        """Checks everything a request can get wrong before the engine sees it, then admits it."""
        sampling = self._validate(request_input, sampling_request, adapter_ref)
        slots = sampling.n
        if self.in_flight + slots > self.max_in_flight:
            counted = f"; this one counts {slots}, one per completion" if slots > 1 else ""
            raise ResourceExhausted(
                f"the generator already holds {self.in_flight} requests (limit {self.max_in_flight}{counted});"
                " retry later"
            )
        # Take the slots before the first await so concurrent requests are counted exactly.
        self.in_flight += slots
        adapter: CatalogEntry | None = None
        try:
            loop = asyncio.get_running_loop()
            rendered = await loop.run_in_executor(self._render_pool, self.renderer.render, request_input)
            sampling = self._fit_to_context(rendered.token_ids, rendered.field, sampling)
            if adapter_ref:
                name, _, alias = parse_served_ref(adapter_ref, "adapter")
                if alias:
                    adapter_ref = await self.aliases.resolve(tenant, name, alias)
                adapter = await self.catalog.acquire(tenant, adapter_ref, "adapter")
        except BaseException:
            self.in_flight -= slots
            raise
        return GenerationStream(self, uuid.uuid4().hex, rendered.token_ids, sampling, adapter,
                                cache_salt=tenant_cache_salt(tenant))

    async def release(self, stream: GenerationStream) -> None:
        self.in_flight -= stream.slots
        if stream.adapter is not None:
            await self.catalog.release(stream.adapter)

    def close(self) -> None:
        self._render_pool.shutdown(wait=False, cancel_futures=True)
