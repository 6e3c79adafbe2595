"""Foundation: generated stubs match the protos, and every service runs as a real process that
reports SERVING, answers reflection and exits cleanly on SIGTERM."""

from __future__ import annotations

import filecmp
import signal
import subprocess
import sys

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ragtune import protogen
from tests.grpc_support import REPO_ROOT, free_port, start_service_process, wait_serving


def test_stubs_in_use_match_the_protos(tmp_path):
    fresh = protogen.generate(tmp_path) 
    in_use = REPO_ROOT / "ragtune" / "v1"
    names = sorted(p.name for p in fresh)
    assert names == sorted(p.name for p in in_use.iterdir() if p.is_file()), "stub files differ; run python -m ragtune.protogen"
    mismatch = [n for n in names if not filecmp.cmp(tmp_path / "ragtune" / "v1" / n, in_use / n, shallow=False)]
    assert not mismatch, f"stale stubs {mismatch}; run python -m ragtune.protogen"


def test_buf_lint_is_clean():
    buf = REPO_ROOT / ".venv" / "bin" / "buf"
    exe = str(buf) if buf.exists() else "buf"
    result = subprocess.run([exe, "lint"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def _list_services(address: str) -> set[str]:
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        return {s.name for r in responses for s in r.list_services_response.service}


SERVICES = [
    ("services.retriever", "RETRIEVER", "ragtune.v1.RetrieverService"),
    ("services.generator", "GENERATOR", "ragtune.v1.GeneratorService"),
    ("services.trainer", "TRAINER", "ragtune.v1.TrainerService"),
    ("gateway", "GATEWAY", "ragtune.v1.GatewayService"),
]


# The generator's process starts the vLLM engine; the trainer's and the gateway's took 24 to 29 s to serve
# and stop here (measured 2026-12 on the shared 2-core machine): slow, out of the fast lane.
SLOW_TO_START = {"services.generator", "services.trainer", "gateway"}


@pytest.mark.parametrize("module,prefix,service", [
    pytest.param(*s, id=s[0], marks=pytest.mark.slow if s[0] in SLOW_TO_START else ()) for s in SERVICES])
def test_service_process_serves_reflects_and_stops_on_sigterm(module, prefix, service, tmp_path):
    port = free_port()
    env = {f"RAGTUNE_{prefix}_PORT": str(port), "RAGTUNE_HOME": str(tmp_path), f"RAGTUNE_{prefix}_GRACE_PERIOD_S": "2"}
    proc = start_service_process(module, env, tmp_path / "service.log")
    try:
        address = f"127.0.0.1:{port}"
        wait_serving(address, service, timeout=600, proc=proc)
        services = _list_services(address)
        assert service in services
        assert "grpc.health.v1.Health" in services
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, (tmp_path / "service.log").read_text()[-4000:]
        log = (tmp_path / "service.log").read_text()
        assert '"message": "stopped"' in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
