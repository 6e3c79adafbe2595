"""Helpers the tests share: free ports, starting real service processes, waiting on health."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(address: str, service: str = "", timeout: float = 300.0, proc: subprocess.Popen | None = None) -> None:
    """Polls grpc.health.v1 until SERVING; fails early if the process died."""
    deadline = time.monotonic() + timeout
    last = None
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"service process exited with {proc.returncode} before SERVING")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                last = reply.status
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as exc:
                last = exc.code()
            time.sleep(0.2)
    raise TimeoutError(f"{address} not SERVING after {timeout} s (last: {last})")


def start_service_process(module: str, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Starts `python -m <module>` with the given environment added, output to log_path."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    log = open(log_path, "wb")
    return subprocess.Popen(
        [sys.executable, "-m", module], cwd=REPO_ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT
    )


class InProcessServer:
    """Runs a ragtune Service under ServiceHost on port 0 in a background event loop, so plain
    synchronous tests can call it over a real socket. Use as a context manager or call stop()."""

    def __init__(self, service_factory, settings, name: str, extra_interceptors=(), host_settings=None,
                 reuse_port: bool = False):
        """`host_settings` (ragtune.server.HostSettings) and `reuse_port` go to the ServiceHost."""
        import asyncio
        import threading

        from ragtune.server import ServiceHost

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"{name}-loop", daemon=True)
        self._thread.start()

        async def build_and_start():
            host = ServiceHost(service_factory(settings), settings, name=name, extra_interceptors=extra_interceptors,
                               host_settings=host_settings, reuse_port=reuse_port)
            port = await host.start()
            return host, port

        self.host, self.port = asyncio.run_coroutine_threadsafe(build_and_start(), self._loop).result(timeout=900)
        self.address = f"127.0.0.1:{self.port}"
        self.service = self.host.service

    def call(self, coro, timeout: float = 600):
        """Runs a coroutine on the server's loop (e.g. to inspect the service's engine) and returns its result."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=timeout)

    def stop(self, grace: float = 1.0) -> None:
        if self._loop.is_closed():
            return
        self.call(self.host.stop(grace))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
