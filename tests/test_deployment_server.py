"""The server host as a platform runs it: a busy port is refused with a clear message (no silent
SO_REUSEPORT sharing), connections are aged out so clients reconnect, and health tells readiness
(the named service) apart from liveness ("") following what the service reports."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic_settings import SettingsConfigDict

from ragtune.server import HostSettings, PortInUse, ServiceHealth, ServiceHost, server_options
from ragtune.settings import ServiceSettings
from tests.grpc_support import REPO_ROOT, InProcessServer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ToySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RAGTUNE_TOY_", extra="ignore", frozen=True)


class ToyService:
    """A service with only health: its `report` is what it says about itself when asked."""

    service_names = ("ragtune.v1.ToyService",)

    def __init__(self, settings):
        self.report = ServiceHealth(ready=True)

    def register(self, server):
        pass

    async def start(self):
        pass

    async def stop(self):
        pass

    async def health(self) -> ServiceHealth:
        return self.report


def statuses(address: str) -> tuple[int, int]:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return tuple(
            stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            for name in ("", "ragtune.v1.ToyService")
        )


def test_server_options_refuse_port_sharing_and_age_connections():
    options = dict(server_options(HostSettings()))
    assert options["grpc.so_reuseport"] == 0
    assert options["grpc.max_connection_age_ms"] == 30_000  # the documented default
    assert "grpc.max_connection_age_grace_ms" not in options  # calls in flight run to their end by default
    tuned = dict(server_options(HostSettings(max_connection_age_s=5, max_connection_age_grace_s=60)))
    assert (tuned["grpc.max_connection_age_ms"], tuned["grpc.max_connection_age_grace_ms"]) == (5000, 60_000)


def test_host_settings_read_the_environment(monkeypatch):
    monkeypatch.setenv("RAGTUNE_GRPC_MAX_CONNECTION_AGE_S", "12.5")
    monkeypatch.setenv("RAGTUNE_GRPC_MAX_CONNECTION_AGE_GRACE_S", "300")
    settings = HostSettings()
    assert (settings.max_connection_age_s, settings.max_connection_age_grace_s) == (12.5, 300)


def test_second_instance_on_a_busy_port_fails_with_a_clear_message():
    with InProcessServer(ToyService, ToySettings(port=0), "toy") as first:
        async def start():
            # Built on a running loop, as grpc.aio servers are.
            second = ServiceHost(ToyService(None), ToySettings(port=first.port), name="toy")
            await second.start()

        with pytest.raises(PortInUse) as caught:
            first.call(start())
        message = str(caught.value)
        assert f"127.0.0.1:{first.port}" in message and "already in use" in message and "RAGTUNE_TOY_PORT" in message
        assert statuses(first.address) == (SERVING, SERVING)  # the first one is untouched


def test_a_service_process_on_a_busy_port_exits_with_the_message(tmp_path):
    """`python -m gateway` on a taken port exits non-zero at once, saying which port and which setting."""
    with InProcessServer(ToyService, ToySettings(port=0), "toy") as first:
        env = {"RAGTUNE_GATEWAY_PORT": str(first.port), "RAGTUNE_HOME": str(tmp_path), "RAGTUNE_LOG_FORMAT": "text"}
        proc = subprocess.run(
            [sys.executable, "-m", "gateway"], cwd=REPO_ROOT, env={**_base_env(), **env},
            capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert f"127.0.0.1:{first.port}: the address is already in use" in proc.stderr
        assert "RAGTUNE_GATEWAY_PORT" in proc.stderr and "Traceback" not in proc.stderr
        assert statuses(first.address) == (SERVING, SERVING)


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("RAGTUNE_")} | {"PYTHONUNBUFFERED": "1"}


def test_health_follows_what_the_service_reports():
    """Not ready: the named service NOT_SERVING (readiness), the server still SERVING (liveness), RPCs
    refused with the reason; unrecoverable: both NOT_SERVING; recovered: both SERVING again."""
    fast = HostSettings(health_check_interval_s=0.05)
    with InProcessServer(ToyService, ToySettings(port=0), "toy", host_settings=fast) as server:
        assert statuses(server.address) == (SERVING, SERVING)
        server.service.report = ServiceHealth(ready=False, reason="toy engine busy restarting")
        server.call(server.host.check_health())
        assert statuses(server.address) == (SERVING, NOT_SERVING)
        server.service.report = ServiceHealth(ready=False, live=False, reason="toy engine is gone")
        _wait(lambda: statuses(server.address) == (NOT_SERVING, NOT_SERVING))
        assert server.host.readiness.ready is False
        server.service.report = ServiceHealth(ready=True)
        _wait(lambda: statuses(server.address) == (SERVING, SERVING))
        assert server.host.readiness.ready is True


def test_refused_calls_carry_the_reason():
    """While a service is not ready its RPCs answer UNAVAILABLE with the reason it gave, at once."""
    from ragtune.server import ReadinessInterceptor

    gate = ReadinessInterceptor("toy")
    gate.refuse("the toy engine has stopped")
    assert gate.ready is False and gate._status.details == "the toy engine has stopped"
    assert gate._status.code == grpc.StatusCode.UNAVAILABLE


def _wait(check, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "health did not follow the service's report"
        time.sleep(0.05)


@pytest.mark.parametrize("module,env,expected", [
    ("services.generator", {"RAGTUNE_GENERATOR_BLOCK_SIZE": "48"},
     "RAGTUNE_GENERATOR_BLOCK_SIZE='48': Input should be a multiple of 32"),
    ("services.retriever", {"RAGTUNE_RETRIEVER_ANN_ROWS_PER_PARTITION": "ten"},
     "RAGTUNE_RETRIEVER_ANN_ROWS_PER_PARTITION='ten': Input should be a valid integer"),
    ("gateway", {"RAGTUNE_LOG_FORMAT": "xml"}, "RAGTUNE_LOG_FORMAT='xml': Input should be 'json' or 'text'"),
    ("services.trainer", {"RAGTUNE_TRAINER_PORT": "99999"},
     "RAGTUNE_TRAINER_PORT='99999': Input should be less than or equal to 65535"),
], ids=["generator", "retriever", "gateway", "trainer"])
def test_a_bad_setting_stops_the_service_naming_the_variable(module, env, expected, tmp_path):
    """`python -m <service>` as deployed: exit 2 and a line naming the variable and the rule, no traceback,
    before anything is loaded."""
    proc = subprocess.run([sys.executable, "-m", module], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RAGTUNE_HOME": str(tmp_path), **env})
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_bad_setting_never_echoes_what_may_be_a_secret(monkeypatch):
    from pydantic import ValidationError

    from ragtune.settings import settings_errors

    class Secretive(ServiceSettings):
        model_config = SettingsConfigDict(env_prefix="RAGTUNE_TOY_", extra="ignore", frozen=True)
        api_key: int = 0

    monkeypatch.setenv("RAGTUNE_TOY_API_KEY", "sk-hunter2")
    with pytest.raises(ValidationError) as caught:
        Secretive()
    lines = settings_errors(Secretive, caught.value)
    assert lines == ["RAGTUNE_TOY_API_KEY: Input should be a valid integer, unable to parse string as an integer"]
