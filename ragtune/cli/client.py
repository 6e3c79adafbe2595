"""A small client of the gateway for the CLI and the demo: one channel, the API key on every call."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

import grpc

from ragtune.errors import bad_request_violations
from ragtune.v1 import gateway_pb2_grpc

DEFAULT_GATEWAY = "127.0.0.1:50051"


def dev_key_path() -> Path:
    home = Path(os.environ.get("RAGTUNE_HOME", Path("~/.cache/ragtune").expanduser()))
    return home / "dev-api-key"


def resolve_api_key(explicit: str | None) -> str | None:
    """--api-key, else RAGTUNE_API_KEY, else the local dev key written by `ragtune up`."""
    if explicit:
        return explicit
    if os.environ.get("RAGTUNE_API_KEY"):
        return os.environ["RAGTUNE_API_KEY"]
    path = dev_key_path()
    return path.read_text().strip() if path.exists() else None


class GatewayClient:
    def __init__(self, address: str, api_key: str | None, timeout: float = 600.0):
        self.channel = grpc.insecure_channel(
            address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
        )
        self.stub = gateway_pb2_grpc.GatewayServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout = timeout

    def call(self, method: str, request, timeout: float | None = None):
        return getattr(self.stub, method)(request, metadata=self.metadata, timeout=timeout or self.timeout)

    def stream(self, method: str, request, timeout: float | None = None) -> Iterator:
        return getattr(self.stub, method)(request, metadata=self.metadata, timeout=timeout or self.timeout)

    def stream_in(self, method: str, requests: Iterable, timeout: float | None = None):
        return getattr(self.stub, method)(iter(requests), metadata=self.metadata, timeout=timeout or self.timeout)

    def close(self) -> None:
        self.channel.close()


def describe_error(exc: grpc.RpcError) -> str:
    """One readable line for a failed call, with the fields a BadRequest names."""
    text = f"{exc.code().name}: {exc.details()}"
    fields = bad_request_violations(exc)
    if fields:
        text += "\n" + "\n".join(f"  - {v.field}: {v.description}" for v in fields)
    return text
