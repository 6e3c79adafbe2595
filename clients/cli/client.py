"""A small client of the gateway for the CLI and the demo: one channel, the API key on every call.

TLS: the CLI's --tls/--ca/--cert/--key/--server-name, each defaulting to the environment
(RAGTUNE_TLS=1, RAGTUNE_TLS_CA_FILE, RAGTUNE_TLS_CLIENT_CERT_FILE / _KEY_FILE,
RAGTUNE_TLS_SERVER_NAME_OVERRIDE: the same variables the services read, ragtune/tls.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

import grpc

from ragtune.errors import bad_request_violations, quota_violations, retry_delay_s
from ragtune.settings import TLSSettings
from ragtune.tls import client_credentials
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


# What TLS errors call each setting: the flag, or the variable it defaults to.
_TLS_NAMES = {
    "ca_file": "--ca (RAGTUNE_TLS_CA_FILE)",
    "client_cert_file": "--cert (RAGTUNE_TLS_CLIENT_CERT_FILE)",
    "client_key_file": "--key (RAGTUNE_TLS_CLIENT_KEY_FILE)",
}


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def gateway_channel(address: str, *, tls: bool = False, ca: str | Path | None = None, cert: str | Path | None = None,
                    key: str | Path | None = None, server_name: str | None = None, options=()) -> grpc.Channel:
    """A channel to the gateway. Each TLS value not given comes from the environment; TLS is used when
    asked for (`tls`, RAGTUNE_TLS=1) or when a CA or client certificate is given, trusting `ca` (else
    gRPC's default roots) and presenting `cert`/`key` to a gateway that requires client certificates."""
    env = TLSSettings()
    ca, cert, key = ca or env.ca_file, cert or env.client_cert_file, key or env.client_key_file
    server_name = server_name or env.server_name_override
    if not (tls or _truthy(os.environ.get("RAGTUNE_TLS")) or ca or cert or key):
        return grpc.insecure_channel(address, options=list(options))
    credentials = client_credentials(ca, cert, key, names=_TLS_NAMES)
    if server_name:
        options = [*options, ("grpc.ssl_target_name_override", server_name)]
    return grpc.secure_channel(address, credentials, options=list(options))


class GatewayClient:
    def __init__(self, address: str, api_key: str | None, timeout: float = 600.0, *, tls: bool = False,
                 ca: str | Path | None = None, cert: str | Path | None = None, key: str | Path | None = None,
                 server_name: str | None = None):
        self.channel = gateway_channel(
            address, tls=tls, ca=ca, cert=cert, key=key, server_name=server_name,
            options=[("grpc.max_send_message_length", 64 * 1024 * 1024)],
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
    for quota in quota_violations(exc):
        text += f"\n  - {quota.subject}: {quota.description}"
    delay = retry_delay_s(exc)
    if delay is not None:
        text += f"\n  retry in {delay:.1f} s"
    return text
