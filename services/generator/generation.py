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
from ragtune.v1 import common_pb2, generator_pb2
from services.generator.adapters import AdapterCatalog, CatalogEntry
from services.generator.aliases import AliasResolver
from services.generator.engine import Chunk, GenerationEngine, Sampling
from services.generator.prompts import PromptRenderer
from services.generator.sampling import parse_sampling


class GenerationStream:
    """A request admitted and submitted: iterate `chunks()`; `close()` (idempotent) aborts it in the
    engine if it is still running and gives back its admission slot and adapter."""

    def __init__(
        self,
        generator: "Generator",
        request_id: str,
        prompt_ids: list[int],
        sampling: Sampling,
        adapter: CatalogEntry | None,
    ):
        self._generator = generator
        self.request_id = request_id
        self._prompt_ids = prompt_ids
        self.sampling = sampling
        self.adapter = adapter
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._closed = False

    async def chunks(self) -> AsyncIterator[Chunk]:
        engine = self._generator.engine
        lora = self.adapter.handle if self.adapter else None
        try:
            async for chunk in engine.generate(self.request_id, self._prompt_ids, self.sampling, lora):
                self.completion_tokens += chunk.tokens
                self.finish_reason = chunk.finish_reason or self.finish_reason
                yield chunk
        finally:
            await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.finish_reason is None:
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
    ):
        self.engine = engine
        self.renderer = renderer
        self.catalog = catalog
        self.aliases = aliases
        self.max_in_flight = max_in_flight
        self.default_temperature = default_temperature
        self.default_max_tokens = default_max_tokens
        self.in_flight = 0
        # One thread renders prompts: the tokenizer is not guaranteed thread-safe, and rendering is fast.
        self._render_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prompt-render")

    def _validate(
        self, request_input: generator_pb2.GenerationInput, sampling_msg: common_pb2.SamplingParams, adapter_ref: str
    ) -> Sampling:
        bad: list[FieldViolation] = list(self.renderer.check(request_input))
        sampling, sampling_bad = parse_sampling(sampling_msg, default_temperature=self.default_temperature)
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
        request_input: generator_pb2.GenerationInput,
        sampling_msg: common_pb2.SamplingParams,
        adapter_ref: str,
    ) -> GenerationStream:
        """Checks everything a request can get wrong before the engine sees it, then admits it."""
        sampling = self._validate(request_input, sampling_msg, adapter_ref)
        if self.in_flight >= self.max_in_flight:
            raise ResourceExhausted(
                f"the generator already holds {self.in_flight} requests (limit {self.max_in_flight}); retry later"
            )
        # Take the slot before the first await so concurrent requests are counted exactly.
        self.in_flight += 1
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
            self.in_flight -= 1
            raise
        return GenerationStream(self, uuid.uuid4().hex, rendered.token_ids, sampling, adapter)

    async def release(self, stream: GenerationStream) -> None:
        self.in_flight -= 1
        if stream.adapter is not None:
            await self.catalog.release(stream.adapter)

    def close(self) -> None:
        self._render_pool.shutdown(wait=False, cancel_futures=True)
