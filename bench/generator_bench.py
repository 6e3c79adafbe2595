"""Generator benchmark: output tokens/s and time to first token through the gRPC service, against raw
vLLM and transformers `generate`, and over LoRA adapters, all measured in one run.

Every system runs in its own process, one at a time, on the same model, chat prompts and greedy
sampling (max_tokens 64), at 1, 4 and 16 concurrent streams:
- service: `python -m services.generator` as a process, driven over gRPC (GenerateStream);
- raw: vLLM's AsyncLLM with the service's engine settings, driven in-process;
- transformers: `model.generate` on the same prompts batched (left padding), batch = concurrency;
- adapters: 16 streams over the base model, over 1 adapter, and spread over 4 distinct adapters
  (PEFT LoRA r=8 on q/k/v/o), through the service and raw;
- the service and raw vLLM run twice when tcmalloc and Intel OpenMP are found: plainly, and with
  both preloaded through LD_PRELOAD (vLLM's CPU guide).

Run: .venv/bin/python -m bench.generator_bench [--max-tokens 64]; writes bench/results/generator.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import summary, write_result
from services.generator.preload import preload_value

REPO_ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = (1, 4, 16)
TENANT = "bench"
ADAPTERS = ("bench-a", "bench-b", "bench-c", "bench-d")
QUESTIONS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a rainbow forms.",
    "Describe a busy market in the morning.",
    "Write a poem about the sea.",
    "Explain why the sky is blue.",
    "Describe how bread is baked.",
    "Tell me about the history of the bicycle.",
    "Write a letter to a friend about a trip to the mountains.",
    "Explain how plants make food from sunlight.",
    "Describe a thunderstorm.",
    "Write a short story about a lost cat.",
    "Explain how a computer stores numbers.",
    "Describe the life of a honey bee.",
    "Write a diary entry of a sailor.",
    "Explain how a bridge carries weight.",
    "Describe a winter morning in a small village.",
]
# Engine settings shared by the service and raw vLLM so that the comparison is like for like. max_lora_rank
# matches the adapters' rank: vLLM sizes its LoRA buffers by it (16 for r=8 adapters measured ~1.5x slower).
ENGINE = dict(max_model_len=2048, max_num_seqs=16, max_loras=4, max_lora_rank=8, max_cpu_loras=8, kv_cache_gib=2)


def prompt_token_ids() -> list[list[int]]:
    from transformers import AutoTokenizer

    from ragtune.models import base_model_dir

    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir()))
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in QUESTIONS
    ]
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def make_adapters(registry_root: Path) -> None:
    """Publishes LoRA r=8 adapters on q/k/v/o with small random weights (close to the base, so answer
    lengths match and only the adapter arithmetic differs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ragtune.models import BASE_MODEL_NAME, base_model_dir
    from ragtune.registry import AdapterRegistry

    registry = AdapterRegistry(registry_root)
    base = AutoModelForCausalLM.from_pretrained(str(base_model_dir()), dtype=torch.float32)
    for i, name in enumerate(ADAPTERS):
        torch.manual_seed(i)
        model = get_peft_model(
            base,
            LoraConfig(
                r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"
            ),
        )
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if "lora_B" in pname:
                    param.normal_(0, 1e-3)
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder, safe_serialization=True)
            registry.publish(
                TENANT,
                name,
                Path(folder),
                {"base_model": BASE_MODEL_NAME, "method": "lora", "rank": 8, "servable": True},
            )
        model.unload()


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


async def run_streams(open_stream, concurrency: int, adapters: list[str], rounds: int = 1) -> dict:
    """Runs `concurrency` streams at once, `rounds` times; open_stream(i, adapter) yields (tokens) per delta."""
    ttfts: list[float] = []
    total_tokens = 0
    started = time.perf_counter()
    for r in range(rounds):

        async def one(i: int) -> int:
            t0 = time.perf_counter()
            first = None
            tokens = 0
            async for n in open_stream(i, adapters[i % len(adapters)] if adapters else ""):
                if first is None and n > 0:
                    first = time.perf_counter() - t0
                tokens += n
            ttfts.append((first or 0.0) * 1000)
            return tokens

        counts = await asyncio.gather(*(one(r * concurrency + i) for i in range(concurrency)))
        total_tokens += sum(counts)
    wall = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "streams": concurrency * rounds,
        "output_tokens": total_tokens,
        "seconds": round(wall, 3),
        "tokens_per_s": round(_rate(total_tokens, wall), 2),
        "ttft_ms": summary(ttfts),
    }


async def measure(open_stream, max_tokens: int) -> dict:
    await run_streams(open_stream, 2, [])  # warm-up
    result = {"base": {}}
    for c in CONCURRENCY:
        result["base"][str(c)] = await run_streams(open_stream, c, [], rounds=2 if c == 1 else 1)
    result["adapters_1"] = await run_streams(open_stream, 16, list(ADAPTERS[:1]))
    result["adapters_4"] = await run_streams(open_stream, 16, list(ADAPTERS))
    return result


# --- workers: each runs in its own process and prints one JSON line -------------------------------


async def raw_worker(registry_root: Path, max_tokens: int) -> dict:
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(ENGINE["kv_cache_gib"])
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    from ragtune.models import base_model_dir

    started = time.perf_counter()
    llm = AsyncLLM.from_engine_args(
        AsyncEngineArgs(
            model=str(base_model_dir()),
            dtype="float32",
            enforce_eager=True,
            max_model_len=ENGINE["max_model_len"],
            max_num_seqs=ENGINE["max_num_seqs"],
            enable_lora=True,
            max_loras=ENGINE["max_loras"],
            max_lora_rank=ENGINE["max_lora_rank"],
            max_cpu_loras=ENGINE["max_cpu_loras"],
            disable_log_stats=True,
        )
    )
    start_s = time.perf_counter() - started
    ids = prompt_token_ids()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, output_kind=RequestOutputKind.DELTA)
    loras = {
        name: LoRARequest(lora_name=name, lora_int_id=i + 1, lora_path=str(registry_root / TENANT / name / "1"))
        for i, name in enumerate(ADAPTERS)
    }
    counter = iter(range(10**9))

    async def open_stream(i: int, adapter: str):
        async for out in llm.generate(
            {"prompt_token_ids": ids[i % len(ids)]}, params, f"r{next(counter)}", lora_request=loras.get(adapter)
        ):
            yield len(out.outputs[0].token_ids)

    try:
        result = await measure(open_stream, max_tokens)
    finally:
        llm.shutdown()
    return {"start_s": round(start_s, 1), **result}


def transformers_worker(max_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragtune.models import base_model_dir

    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir()), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(str(base_model_dir()), dtype=torch.float32).eval()
    ids = prompt_token_ids()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def batch(n: int, offset: int = 0):
        rows = [ids[(offset + i) % len(ids)] for i in range(n)]
        width = max(map(len, rows))
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return input_ids, mask

    def generate(n: int, new_tokens: int, offset: int = 0) -> tuple[int, float]:
        input_ids, mask = batch(n, offset)
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad
            )
        seconds = time.perf_counter() - started
        tokens = 0
        for row in out[:, input_ids.shape[1] :].tolist():
            # Count up to and including the end-of-sequence token, as vLLM does; the rest is padding.
            tokens += row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
        return tokens, seconds

    def measure_at(threads: int) -> dict:
        torch.set_num_threads(threads)
        generate(2, 4)  # warm-up
        found = {}
        for c in CONCURRENCY:
            rounds = 2 if c == 1 else 1
            tokens = seconds = 0.0
            for r in range(rounds):
                t, s = generate(c, max_tokens, offset=r * c)
                tokens += t
                seconds += s
            _, first = generate(c, 1)
            found[str(c)] = {
                "concurrency": c,
                "streams": c * rounds,
                "threads": threads,
                "output_tokens": int(tokens),
                "seconds": round(seconds, 3),
                "tokens_per_s": round(_rate(int(tokens), seconds), 2),
                "ttft_ms": {
                    "n": 1,
                    "p50": first * 1000,
                    "p95": first * 1000,
                    "mean": first * 1000,
                    "note": "whole batch's prefill + first token (generate is not streaming)",
                },
            }
        return found

    # On shared cores two OpenMP threads can be far slower than one: measure both, compare with the best.
    by_threads = {str(n): measure_at(n) for n in (1, 2)}
    best = {
        c: max((found[c] for found in by_threads.values()), key=lambda row: row["tokens_per_s"])
        for c in map(str, CONCURRENCY)
    }
    return {"base": best, "by_threads": by_threads}


# --- the service, as its own process --------------------------------------------------------------


async def service_run(registry_root: Path, env: dict[str, str], max_tokens: int, log_path: Path) -> dict:
    import grpc

    from ragtune.tenancy import tenant_metadata
    from ragtune.v1 import common_pb2, generator_pb2, generator_pb2_grpc
    from tests.grpc_support import free_port, wait_serving

    port = free_port()
    settings_env = {
        "RAGTUNE_GENERATOR_PORT": str(port),
        "RAGTUNE_ADAPTER_REGISTRY": str(registry_root),
        "RAGTUNE_GENERATOR_MAX_MODEL_LEN": str(ENGINE["max_model_len"]),
        "RAGTUNE_GENERATOR_MAX_NUM_SEQS": str(ENGINE["max_num_seqs"]),
        "RAGTUNE_GENERATOR_MAX_LORAS": str(ENGINE["max_loras"]),
        "RAGTUNE_GENERATOR_MAX_LORA_RANK": str(ENGINE["max_lora_rank"]),
        "RAGTUNE_GENERATOR_MAX_CPU_LORAS": str(ENGINE["max_cpu_loras"]),
        "RAGTUNE_GENERATOR_KV_CACHE_SPACE_GIB": str(ENGINE["kv_cache_gib"]),
        "RAGTUNE_LOG_LEVEL": "WARNING",
    }
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.generator"],
            cwd=REPO_ROOT,
            env={**os.environ, **env, **settings_env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        address = f"127.0.0.1:{port}"
        await asyncio.to_thread(wait_serving, address, "ragtune.v1.GeneratorService", 600, proc)
        start_s = time.perf_counter() - started
        async with grpc.aio.insecure_channel(address) as channel:
            stub = generator_pb2_grpc.GeneratorServiceStub(channel)
            metadata = tenant_metadata(TENANT)
            for name in ADAPTERS:
                await stub.LoadAdapter(generator_pb2.LoadAdapterRequest(name=name), metadata=metadata)

            async def open_stream(i: int, adapter: str):
                question = QUESTIONS[i % len(QUESTIONS)]
                request = generator_pb2.GenerateStreamRequest(
                    input=generator_pb2.GenerationInput(
                        chat=generator_pb2.ChatMessages(
                            messages=[common_pb2.ChatMessage(role="user", content=question)]
                        )
                    ),
                    sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens),
                    adapter=adapter,
                )
                seen = 0
                async for message in stub.GenerateStream(request, metadata=metadata):
                    # Deltas carry text; the token count comes with the final message's usage.
                    if message.HasField("usage"):
                        yield message.usage.completion_tokens - seen
                    elif message.delta:
                        seen += 1
                        yield 1

            result = await measure(open_stream, max_tokens)
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    return {"start_s": round(start_s, 1), **result}


def _worker(kind: str, registry_root: Path, env: dict[str, str], max_tokens: int) -> dict:
    command = [
        sys.executable,
        "-m",
        "bench.generator_bench",
        "--worker",
        kind,
        "--registry",
        str(registry_root),
        "--max-tokens",
        str(max_tokens),
    ]
    done = subprocess.run(
        command, cwd=REPO_ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=1800
    )
    if done.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--worker", choices=["raw", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--registry", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--no-preload", action="store_true", help="skip the LD_PRELOAD (tcmalloc + iomp5) variant")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.worker == "raw":
        print(json.dumps(asyncio.run(raw_worker(args.registry, args.max_tokens))))
        return 0
    if args.worker == "transformers":
        print(json.dumps(transformers_worker(args.max_tokens)))
        return 0

    work = Path(tempfile.mkdtemp(prefix="ragtune-generator-bench-"))
    registry_root = work / "adapters"
    make_adapters(registry_root)
    variants = {"plain": {"LD_PRELOAD": "", "RAGTUNE_GENERATOR_PRELOAD_LIBRARIES": "false"}}
    preload = preload_value()
    if preload and not args.no_preload:
        # The service's own launcher adds the preload (the path deployments take); raw vLLM gets it directly.
        variants["preload"] = {"LD_PRELOAD": "", "RAGTUNE_GENERATOR_PRELOAD_LIBRARIES": "true"}

    results: dict = {
        "settings": {
            "max_tokens": args.max_tokens,
            "concurrency": CONCURRENCY,
            "engine": ENGINE,
            "adapters": "LoRA r=8 on q/k/v/o",
            "preload": preload,
        }
    }
    print("transformers ...", flush=True)
    results["transformers"] = _worker("transformers", registry_root, {}, args.max_tokens)
    for variant, env in variants.items():
        print(f"service ({variant}) ...", flush=True)
        results[f"service_{variant}"] = asyncio.run(
            service_run(registry_root, env, args.max_tokens, work / f"service-{variant}.log")
        )
        print(f"raw vLLM ({variant}) ...", flush=True)
        raw_env = {"LD_PRELOAD": preload if variant == "preload" else ""}
        results[f"raw_{variant}"] = _worker("raw", registry_root, raw_env, args.max_tokens)

    ratios: dict = {}
    for variant in variants:
        service, raw = results[f"service_{variant}"], results[f"raw_{variant}"]
        for c in map(str, CONCURRENCY):
            s_tps = service["base"][c]["tokens_per_s"]
            ratios[f"{variant}: service / transformers, {c} streams"] = _ratio(
                s_tps, results["transformers"]["base"][c]["tokens_per_s"]
            )
            ratios[f"{variant}: service / raw vLLM, {c} streams"] = _ratio(s_tps, raw["base"][c]["tokens_per_s"])
            ratios[f"{variant}: service TTFT p50 / raw TTFT p50, {c} streams"] = _ratio(
                service["base"][c]["ttft_ms"]["p50"], raw["base"][c]["ttft_ms"]["p50"]
            )
        for system, data in (("service", service), ("raw vLLM", raw)):
            base16 = data["base"]["16"]["tokens_per_s"]
            ratios[f"{variant}: {system} 1 adapter / base, 16 streams"] = _ratio(
                data["adapters_1"]["tokens_per_s"], base16
            )
            ratios[f"{variant}: {system} 4 adapters / base, 16 streams"] = _ratio(
                data["adapters_4"]["tokens_per_s"], base16
            )
    if "preload" in variants:
        for c in map(str, CONCURRENCY):
            ratios[f"service preload / plain, {c} streams"] = _ratio(
                results["service_preload"]["base"][c]["tokens_per_s"],
                results["service_plain"]["base"][c]["tokens_per_s"],
            )
        ratios["service start preload / plain"] = _ratio(
            results["service_preload"]["start_s"], results["service_plain"]["start_s"]
        )
    results["ratios"] = ratios
    write_result("generator", results)
    for key, value in ratios.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
