"""The images' health probe (`python -m ragtune.healthcheck`, their Docker HEALTHCHECK) against a
real gRPC server."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.grpc_support import REPO_ROOT, free_port

@pytest.fixture(scope="module")
def health_server():
    """A real gRPC server with grpc.health.v1: the server SERVING, one service NOT_SERVING."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    port = free_port()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("ragtune.v1.GatewayService", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("ragtune.v1.GeneratorService", health_pb2.HealthCheckResponse.NOT_SERVING)
    yield f"127.0.0.1:{port}"
    server.stop(0)


def healthcheck(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ragtune.healthcheck", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )


def test_healthcheck_exits_0_when_serving(health_server):
    assert healthcheck(health_server).returncode == 0
    proc = healthcheck(health_server, "ragtune.v1.GatewayService")
    assert proc.returncode == 0 and "SERVING" in proc.stdout


def test_healthcheck_exits_1_when_not_serving_unknown_or_unreachable(health_server):
    not_serving = healthcheck(health_server, "ragtune.v1.GeneratorService")
    assert not_serving.returncode == 1 and "NOT_SERVING" in not_serving.stderr
    unknown = healthcheck(health_server, "ragtune.v1.NoSuchService")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    unreachable = healthcheck(f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert unreachable.returncode == 1 and ("UNAVAILABLE" in unreachable.stderr or "DEADLINE" in unreachable.stderr)
