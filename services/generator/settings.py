"""Generator settings (environment variables prefixed RAGTUNE_GENERATOR_)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from ragtune.models import BASE_MODEL_NAME
from ragtune.settings import ServiceSettings


class GeneratorSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RAGTUNE_GENERATOR_", extra="ignore", frozen=True)

    port: int = Field(50053, ge=0, le=65535)
    base_model_dir: Path | None = Field(
        None,
        description="Folder of the base model (safetensors + tokenizer); default <model_cache>/SmolLM2-135M-Instruct.",
    )
    base_model_name: str = Field(
        BASE_MODEL_NAME, description="Name of the base model; adapters must name the same base_model in ragtune.json."
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="Weights dtype; float32 on CPU (bfloat16 measured 5x slower there)."
    )
    enforce_eager: bool = Field(True, description="Skip graph compilation: starts in ~35 s instead of ~145 s on CPU.")
    max_model_len: int = Field(2048, ge=64, description="Context window in tokens (prompt plus completion).")
    kv_cache_space_gib: float = Field(
        2.0, gt=0, description="CPU KV cache size in GiB (sets VLLM_CPU_KVCACHE_SPACE); ignored on GPU."
    )
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="Share of GPU memory vLLM may take (GPU only).")
    max_num_seqs: int = Field(32, ge=1, description="Requests the engine runs in one batch.")
    block_size: int | None = Field(
        32, ge=32, le=256, multiple_of=32, description="KV cache block size in tokens (vLLM's CPU attention wants a"
        " multiple of 32); unset: vLLM's default (128 on CPU). Prefix caching reuses whole blocks only: with 32 the"
        " first 32 of the RAG prompt's 54 fixed tokens are computed once, not per request (one-passage time to first"
        " token 212 -> 183 ms here, bench/first_token_bench.py)."
    )
    reserved_cpus: int | None = Field(
        0, ge=0, description="CPUs vLLM's CPU engine leaves to its scheduler process (sets VLLM_CPU_NUM_OF_RESERVED_CPU);"
        " unset: vLLM's default, one. On the 2-core machine reserving one halved the cores a forward pass runs on:"
        " with 0 a four-passage prompt (517 tokens) reached its first token in 526 ms instead of 1,010 ms, and decoding"
        " took 48 ms a token instead of 66. Raise it where the pod has cores to spare. Ignored on GPU."
    )
    max_waiting_requests: int = Field(
        64, ge=0, description="Requests allowed to wait beyond max_num_seqs; more get RESOURCE_EXHAUSTED at once."
    )
    max_loras: int = Field(4, ge=1, description="Adapters in one batch; requests over more adapters wait their turn.")
    max_lora_rank: int = Field(
        16,
        ge=1,
        description="Highest LoRA rank accepted. vLLM sizes its LoRA buffers by it: set it to the largest rank served "
        "(8 instead of 16 made requests over 4 r=8 adapters about 1.5x faster on CPU).",
    )
    max_cpu_loras: int = Field(16, ge=1, description="Adapters kept in host memory before the least recent is evicted.")
    preload_libraries: bool = Field(
        True,
        description="`python -m services.generator` re-executes itself with tcmalloc and Intel OpenMP in LD_PRELOAD "
        "when both are installed and vLLM is the CPU build (vLLM's CPU guide; faster here).",
    )
    default_max_tokens: int = Field(
        256, ge=1, description="max_tokens when a request leaves it unset (capped by the context)."
    )
    default_temperature: float = Field(0.7, ge=0, le=2, description="temperature when a request leaves it unset.")
    max_n: int = Field(
        8,
        ge=1,
        le=128,
        description="Most completions one request may ask for (sampling.n). vLLM runs each as a sequence of its"
        " own, so a request with n = k counts k against max_num_seqs + max_waiting_requests.",
    )
    engine_stall_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Health: an engine that holds requests but has produced no output for this long is taken as hung"
        " (readiness and liveness NOT_SERVING, so the kubelet restarts the pod). Longer than the slowest prefill.",
    )

    alias_refresh_s: float = Field(
        2.0, gt=0, le=300, description="How often this replica re-reads an adapter alias ('<name>@<alias>') from the"
        " control plane: every replica serves an alias's new target at most this long after it moves."
    )

    @model_validator(mode="after")
    def _cpu_loras_hold_a_batch(self) -> "GeneratorSettings":
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(
                "max_cpu_loras must be at least max_loras (vLLM keeps every batched adapter in host memory)"
            )
        return self

    @property
    def model_dir(self) -> Path:
        return self.base_model_dir or self.model_cache / BASE_MODEL_NAME

    @property
    def max_in_flight(self) -> int:
        return self.max_num_seqs + self.max_waiting_requests
