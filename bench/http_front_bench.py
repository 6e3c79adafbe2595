"""HTTP front benchmark: the same streamed chat request through the gateway's gRPC API and through its
OpenAI-compatible HTTP API (server-sent events), interleaved in one run: p50/p95 of total latency and of
time to first token both ways, the difference (the HTTP front's own overhead) and their ratio.

Two parts:
- fakes: a gateway as deployed (interceptors, tracing) in front of instant stand-ins for the retriever
  and generator (bench/gateway_fakes.py), so generation noise cannot hide a millisecond: the
  difference is what the HTTP front (uvicorn, JSON, SSE framing) adds over gRPC;
- suite: the real four services (clients.launcher.isolated_suite): the same comparison with real
  generation, and time to first token through the front.

gRPC side: ChatStream when the gateway serves it (the same chat pipeline the HTTP front uses), else
AskStream with no_retrieval. Clients keep one connection each (a gRPC channel, an HTTP keep-alive connection).

Run: .venv/bin/python -m bench.http_front_bench [--rounds 3 --requests 30]; writes bench/results/http_front.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import tempfile
import time

import grpc

from bench.common import summary, write_result

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class GrpcChat:
    """The streamed request over gRPC: ChatStream, or AskStream(no_retrieval) where ChatStream is not served."""

    def __init__(self, address: str, key: str, model_adapter: str = ""):
        from ragtune.v1 import gateway_pb2, gateway_pb2_grpc

        self.pb = gateway_pb2
        self.stub = gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(address))
        self.metadata = (("authorization", f"Bearer {key}"),)
        self.rpc = "ChatStream"

    def __call__(self, max_tokens: int) -> tuple[float, float]:
        from ragtune.v1 import common_pb2

        sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens)
        t0 = time.perf_counter()
        first = None
        if self.rpc == "ChatStream":
            conversation = self.pb.ChatConversation(
                messages=[common_pb2.ChatMessage(**m) for m in MESSAGES], sampling=sampling)
            try:
                for event in self.stub.ChatStream(self.pb.ChatStreamRequest(conversation=conversation),
                                                  metadata=self.metadata, timeout=120):
                    if first is None and event.WhichOneof("event") == "delta" and event.delta.content:
                        first = time.perf_counter()
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                self.rpc = "AskStream"
                return self(max_tokens)
        else:
            question = self.pb.AskQuestion(question=MESSAGES[-1]["content"], no_retrieval=True, sampling=sampling)
            for event in self.stub.AskStream(self.pb.AskStreamRequest(question=question), metadata=self.metadata,
                                             timeout=120):
                if first is None and event.WhichOneof("event") == "delta" and event.delta:
                    first = time.perf_counter()
        end = time.perf_counter()
        return (end - t0) * 1000, ((first or end) - t0) * 1000


class HttpChat:
    """The streamed request over HTTP: POST /v1/chat/completions with stream=true, read as SSE. The client
    is the standard library's http.client on one keep-alive connection: httpx added about 2 ms per request
    on the client side here (measured), which is not the front's cost."""

    def __init__(self, port: int, key: str, model: str):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        self.model = model

    def __call__(self, max_tokens: int) -> tuple[float, float]:
        body = json.dumps({"model": self.model, "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0,
                           "stream": True})
        t0 = time.perf_counter()
        first = None
        self.connection.request("POST", "/v1/chat/completions", body=body, headers=self.headers)
        reply = self.connection.getresponse()
        if reply.status != 200:
            raise RuntimeError(f"HTTP {reply.status}: {reply.read()!r}")
        while line := reply.readline():
            if first is None and line.startswith(b"data: {"):
                choices = json.loads(line[6:])["choices"]
                if choices and choices[0]["delta"].get("content"):
                    first = time.perf_counter()
        end = time.perf_counter()
        return (end - t0) * 1000, ((first or end) - t0) * 1000


def compare(grpc_chat: GrpcChat, http_chat: HttpChat, rounds: int, requests: int, max_tokens: int,
            warmup: int = 5) -> dict:
    """Interleaved, alternating which goes first; per-round p50s and all requests' p50/p95."""
    for _ in range(warmup):
        grpc_chat(max_tokens)
        http_chat(max_tokens)
    names = ("grpc_total_ms", "http_total_ms", "grpc_ttft_ms", "http_ttft_ms")
    raw: dict[str, list[float]] = {k: [] for k in names}
    per_round: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(rounds):
        values: dict[str, list[float]] = {k: [] for k in names}
        for i in range(requests):
            for side in (("grpc", grpc_chat), ("http", http_chat))[:: 1 if i % 2 else -1]:
                total, ttft = side[1](max_tokens)
                values[f"{side[0]}_total_ms"].append(total)
                values[f"{side[0]}_ttft_ms"].append(ttft)
        for k in names:
            per_round[k].append(summary(values[k])["p50"])
            raw[k].extend(values[k])
    out = {k: summary(v) for k, v in raw.items()}
    out["round_p50s"] = per_round
    for what in ("total", "ttft"):
        g, h = out[f"grpc_{what}_ms"], out[f"http_{what}_ms"]
        out[f"{what}_overhead_p50_ms"] = h["p50"] - g["p50"]
        out[f"{what}_overhead_p95_ms"] = h["p95"] - g["p95"]
        out[f"{what}_overhead_median_round_p50_ms"] = statistics.median(
            a - b for a, b in zip(per_round[f"http_{what}_ms"], per_round[f"grpc_{what}_ms"]))
        out[f"{what}_ratio_p50"] = h["p50"] / g["p50"]
    out["grpc_rpc"] = grpc_chat.rpc
    return out


def fakes_run(rounds: int, requests: int) -> dict:
    from bench.gateway_fakes import FAKE_TOKENS, Child, api_keys

    key, keys_json = api_keys()
    children = []
    try:
        fakes = Child("fakes")
        children.append(fakes)
        port = _free_port()
        gateway = Child("gateway", "telemetry", fakes.address, fakes.address, env={
            "RAGTUNE_HOME": tempfile.mkdtemp(prefix="ragtune-httpbench-"), "BENCH_API_KEYS": keys_json,
            "RAGTUNE_LOG_LEVEL": "WARNING", "RAGTUNE_GATEWAY_HTTP_PORT": str(port)})
        children.append(gateway)
        out = compare(GrpcChat(gateway.address, key), HttpChat(port, key, "fake"), rounds, requests, FAKE_TOKENS)
        out["tokens"] = FAKE_TOKENS
        return out
    finally:
        for child in reversed(children):
            child.stop()


def suite_run(rounds: int, requests: int, max_tokens: int) -> dict:
    from clients.cli.client import dev_key_path
    from clients.launcher import http_port, isolated_suite
    from ragtune.models import BASE_MODEL_NAME

    suite, gateway = isolated_suite("ragtune-httpbench-")
    try:
        suite.start()
        suite.wait_serving()
        key = dev_key_path().read_text().strip()
        out = compare(GrpcChat(gateway, key), HttpChat(http_port(), key, BASE_MODEL_NAME), rounds, requests,
                      max_tokens, warmup=2)
        out["tokens"] = max_tokens
        return out
    finally:
        suite.stop()


def _print(name: str, r: dict) -> None:
    print(f"{name} (gRPC {r['grpc_rpc']} vs HTTP SSE, {r['tokens']} tokens, ms):")
    for what in ("total", "ttft"):
        g, h = r[f"grpc_{what}_ms"], r[f"http_{what}_ms"]
        print(f"  {what:<5} gRPC p50 {g['p50']:8.2f} p95 {g['p95']:8.2f} | HTTP p50 {h['p50']:8.2f} p95 {h['p95']:8.2f}"
              f" | overhead p50 {r[f'{what}_overhead_p50_ms']:+.2f} (median of rounds"
              f" {r[f'{what}_overhead_median_round_p50_ms']:+.2f}), ratio {r[f'{what}_ratio_p50']:.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=30, help="requests per round and side (stand-ins)")
    parser.add_argument("--suite-requests", type=int, default=10, help="requests per round and side (real suite)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per answer in the real suite")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: fakes, suite")
    args = parser.parse_args(argv)
    skip = set(args.skip.split(","))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    result: dict = {"rounds": args.rounds, "targets": {"http_overhead_p50_ms_max": 1.0}}
    if "fakes" not in skip:
        result["fakes"] = fakes_run(args.rounds, args.requests)
        _print("gateway before instant stand-ins", result["fakes"])
    if "suite" not in skip:
        result["suite"] = suite_run(args.rounds, args.suite_requests, args.max_tokens)
        _print("real suite", result["suite"])
    write_result("http_front", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
