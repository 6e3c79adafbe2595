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
