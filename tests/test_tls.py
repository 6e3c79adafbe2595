"""TLS end to end with throwaway certificates (trustme): a real trainer that requires client
certificates (mutual TLS), a real gateway serving TLS that calls it over mutual TLS, the health
check the Kubernetes probes run, the CLI's --ca, and clear start-up errors for bad settings."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.server import GatewayService
from gateway.settings import GatewaySettings
from ragtune import healthcheck
from clients.cli.main import main as cli_main
from ragtune.controlplane.api_keys import new_key_entry
from ragtune.settings import TLSSettings
from ragtune.tls import TLSConfigError, channel_credentials, client_credentials, http_ssl_options, server_credentials
from ragtune.v1 import gateway_pb2, gateway_pb2_grpc, trainer_pb2
from services.trainer.server import TrainerService
from services.trainer.settings import TrainerSettings
from tests.grpc_support import REPO_ROOT, InProcessServer, free_port

TRAINER_SERVICE = "ragtune.v1.TrainerService"


def _write(path: Path, *blobs) -> Path:
    path.write_bytes(b"".join(b.bytes() for b in blobs))
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """One CA for the suite; a server certificate for 127.0.0.1/localhost; a client certificate it
    signed; and a client certificate from another CA, which the servers must refuse."""
    folder = tmp_path_factory.mktemp("pki")
    ca, rogue_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("gateway.ragtune.svc")
    rogue = rogue_ca.issue_cert("intruder.example")
    return SimpleNamespace(
        ca=_write(folder / "ca.pem", ca.cert_pem),
        cert=_write(folder / "server.pem", *server.cert_chain_pems),
        key=_write(folder / "server.key", server.private_key_pem),
        client_cert=_write(folder / "client.pem", *client.cert_chain_pems),
        client_key=_write(folder / "client.key", client.private_key_pem),
        rogue_cert=_write(folder / "rogue.pem", *rogue.cert_chain_pems),
        rogue_key=_write(folder / "rogue.key", rogue.private_key_pem),
    )


def _tls_env(**values: Path | str) -> dict[str, str]:
    """RAGTUNE_TLS_<NAME> variables."""
    return {f"RAGTUNE_TLS_{name.upper()}": str(value) for name, value in values.items()}


def _start(factory, settings, name: str, env: dict[str, str]) -> InProcessServer:
    """Starts a service with these RAGTUNE_TLS_* variables, as its container would (read at start)."""
    with pytest.MonkeyPatch.context() as mp:
        for var in [v for v in os.environ if v.startswith(("RAGTUNE_TLS_", "RAGTUNE_GRPC_HEALTH_PORT"))]:
            mp.delenv(var)
        for var, value in env.items():
            mp.setenv(var, value)
        return InProcessServer(factory, settings, name)


@pytest.fixture(scope="module")
def mtls_trainer(pki, tmp_path_factory):
    """A real trainer that serves TLS only and requires client certificates signed by the CA, with the
    plaintext health-only port the Kubernetes probes use."""
    data_dir = tmp_path_factory.mktemp("trainer")
    settings = TrainerSettings(port=0, data_dir=data_dir, RAGTUNE_DATABASE_URL=f"sqlite:///{data_dir / 'cp.sqlite3'}")
    env = _tls_env(cert_file=pki.cert, key_file=pki.key, client_ca_file=pki.ca)
    server = _start(TrainerService, settings, "trainer", {**env, "RAGTUNE_GRPC_HEALTH_PORT": str(free_port())})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_gateway(pki, mtls_trainer):
    """A real gateway serving TLS (no client certificate asked of its public clients) that calls the
    trainer over mutual TLS, presenting its client certificate."""
    key, entry = new_key_entry("acme", ["read"])
    dead = f"127.0.0.1:{free_port()}"
    settings = GatewaySettings(port=0, http_port=0, api_keys=json.dumps({"keys": [entry]}), retriever_address=dead,
                               generator_address=dead, trainer_address=mtls_trainer.address)
    env = _tls_env(cert_file=pki.cert, key_file=pki.key, ca_file=pki.ca,
                   client_cert_file=pki.client_cert, client_key_file=pki.client_key)
    server = _start(GatewayService, settings, "gateway", env)
    yield SimpleNamespace(address=server.address, key=key, http_port=server.service.http_port)
    server.stop()


def _health(channel: grpc.Channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def _refused(channel: grpc.Channel) -> grpc.RpcError:
    with channel, pytest.raises(grpc.RpcError) as err:
        _health(channel)
    return err.value


def test_mtls_server_answers_a_client_with_a_certificate_from_its_ca(pki, mtls_trainer):
    credentials = client_credentials(pki.ca, pki.client_cert, pki.client_key)
    with grpc.secure_channel(mtls_trainer.address, credentials) as channel:
        assert _health(channel, TRAINER_SERVICE) == health_pb2.HealthCheckResponse.SERVING


def test_tls_server_refuses_a_plaintext_client(mtls_trainer):
    err = _refused(grpc.insecure_channel(mtls_trainer.address))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_server_refuses_a_tls_client_without_a_certificate(pki, mtls_trainer):
    err = _refused(grpc.secure_channel(mtls_trainer.address, client_credentials(pki.ca)))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_server_refuses_a_certificate_from_another_ca(pki, mtls_trainer):
    err = _refused(grpc.secure_channel(mtls_trainer.address, client_credentials(pki.ca, pki.rogue_cert, pki.rogue_key)))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_client_refuses_a_server_its_ca_did_not_sign(pki, mtls_trainer, tmp_path):
    other_ca = _write(tmp_path / "other-ca.pem", trustme.CA().cert_pem)
    credentials = client_credentials(other_ca, pki.client_cert, pki.client_key)
    err = _refused(grpc.secure_channel(mtls_trainer.address, credentials))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_health_port_answers_plaintext_probes_and_nothing_else(mtls_trainer):
    """What the kubelet's native gRPC probe reaches under TLS: the same health, no RPC of the service."""
    address = f"127.0.0.1:{mtls_trainer.host.health_port}"
    assert mtls_trainer.host.health_port not in (None, 0, mtls_trainer.port)
    with grpc.insecure_channel(address) as channel:
        assert _health(channel, TRAINER_SERVICE) == health_pb2.HealthCheckResponse.SERVING
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary("/ragtune.v1.TrainerService/ListJobs")(b"", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert healthcheck.check(address, TRAINER_SERVICE, tls=TLSSettings()) == (healthcheck.SERVING, "SERVING")


def test_gateway_calls_the_trainer_over_mutual_tls(tls_gateway, pki):
    with grpc.secure_channel(tls_gateway.address, client_credentials(pki.ca)) as channel:
        reply = gateway_pb2_grpc.GatewayServiceStub(channel).ListJobs(
            gateway_pb2.GatewayServiceListJobsRequest(request=trainer_pb2.ListJobsRequest()),
            metadata=(("authorization", f"Bearer {tls_gateway.key}"),), timeout=10,
        )
    assert list(reply.response.jobs) == []


def test_gateway_without_a_client_certificate_is_refused_by_the_trainer(pki, mtls_trainer):
    """Mutual TLS holds on the gateway's own path: trusting the CA is not enough to reach a service."""
    key, entry = new_key_entry("acme", ["read"])
    dead = f"127.0.0.1:{free_port()}"
    settings = GatewaySettings(port=0, http_port=-1, api_keys=json.dumps({"keys": [entry]}), retriever_address=dead,
                               generator_address=dead, trainer_address=mtls_trainer.address, retry_attempts=1)
    gateway = _start(GatewayService, settings, "gateway", _tls_env(ca_file=pki.ca))
    try:
        with grpc.insecure_channel(gateway.address) as channel, pytest.raises(grpc.RpcError) as err:
            gateway_pb2_grpc.GatewayServiceStub(channel).ListJobs(
                gateway_pb2.GatewayServiceListJobsRequest(request=trainer_pb2.ListJobsRequest()),
                metadata=(("authorization", f"Bearer {key}"),), timeout=10,
            )
    finally:
        gateway.stop()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "the trainer is unavailable" in err.value.details()


def test_gateway_refuses_a_plaintext_client(tls_gateway):
    assert _refused(grpc.insecure_channel(tls_gateway.address)).code() == grpc.StatusCode.UNAVAILABLE


def test_gateway_http_api_serves_https_with_the_same_certificate(tls_gateway, pki):
    import httpx

    url = f"127.0.0.1:{tls_gateway.http_port}/v1/no-such-route"
    reply = httpx.get(f"https://{url}", verify=ssl.create_default_context(cafile=str(pki.ca)), timeout=10)
    assert reply.status_code == 404 and reply.json()["error"]
    with pytest.raises(httpx.HTTPError):  # plaintext HTTP on the TLS port: no answer
        httpx.get(f"http://{url}", timeout=10)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"https://{url}", timeout=10)  # the system roots do not know the ragtune CA


def test_cli_with_ca_reaches_a_tls_gateway(tls_gateway, pki, capsys, monkeypatch):
    for var in [v for v in os.environ if v.startswith("RAGTUNE_TLS")]:
        monkeypatch.delenv(var)
    base = ["--gateway", tls_gateway.address, "--api-key", tls_gateway.key]
    assert cli_main([*base, "--ca", str(pki.ca), "finetune", "list"]) == 0
    # Without TLS the same command cannot connect; with a CA that did not sign the gateway neither.
    assert cli_main([*base, "finetune", "list"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert cli_main([*base, "--tls", "finetune", "list"]) == 1  # gRPC's default roots do not know the ragtune CA
    # The environment's CA is the flag's default.
    monkeypatch.setenv("RAGTUNE_TLS_CA_FILE", str(pki.ca))
    assert cli_main([*base, "finetune", "list"]) == 0
    assert cli_main([*base, "--ca", str(pki.ca) + ".missing", "finetune", "list"]) == 2
    assert "--ca (RAGTUNE_TLS_CA_FILE)" in capsys.readouterr().err


def test_healthcheck_speaks_mutual_tls_from_the_environment(pki, mtls_trainer):
    port = mtls_trainer.address.rsplit(":", 1)[1]
    good = TLSSettings(ca_file=pki.ca, client_cert_file=pki.client_cert, client_key_file=pki.client_key)
    code, reason = healthcheck.check(f"127.0.0.1:{port}", TRAINER_SERVICE, tls=good, server_name="localhost")
    assert (code, reason) == (healthcheck.SERVING, "SERVING")
    code, reason = healthcheck.check(f"127.0.0.1:{port}", TRAINER_SERVICE, tls=TLSSettings(ca_file=pki.ca))
    assert code == healthcheck.NOT_SERVING and reason.startswith("UNAVAILABLE")
    # As the Kubernetes exec probe runs it: a fresh process with the container's environment.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAGTUNE_TLS")}
    env.update(_tls_env(ca_file=pki.ca, client_cert_file=pki.client_cert, client_key_file=pki.client_key))
    probe = subprocess.run([sys.executable, "-m", "ragtune.healthcheck", f"127.0.0.1:{port}", TRAINER_SERVICE,
                            "--server-name", "localhost"], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert "SERVING" in probe.stdout


def test_incomplete_or_wrong_settings_fail_naming_the_variable(pki, tmp_path):
    with pytest.raises(TLSConfigError, match="RAGTUNE_TLS_CERT_FILE=.*missing.pem: cannot read"):
        server_credentials(TLSSettings(cert_file=tmp_path / "missing.pem", key_file=pki.key))
    with pytest.raises(TLSConfigError, match="RAGTUNE_TLS_CERT_FILE is set but RAGTUNE_TLS_KEY_FILE is not"):
        server_credentials(TLSSettings(cert_file=pki.cert))
    with pytest.raises(TLSConfigError, match="RAGTUNE_TLS_KEY_FILE=.*not a PEM private key"):
        server_credentials(TLSSettings(cert_file=pki.cert, key_file=pki.cert))
    with pytest.raises(TLSConfigError, match="RAGTUNE_TLS_KEY_FILE=.* does not fit RAGTUNE_TLS_CERT_FILE"):
        server_credentials(TLSSettings(cert_file=pki.cert, key_file=pki.client_key))
    with pytest.raises(TLSConfigError, match="RAGTUNE_TLS_CLIENT_CA_FILE is set but the server has no certificate"):
        server_credentials(TLSSettings(client_ca_file=pki.ca))
    with pytest.raises(TLSConfigError, match="RAGTUNE_TLS_CLIENT_CERT_FILE is set but RAGTUNE_TLS_CA_FILE is not"):
        channel_credentials(TLSSettings(client_cert_file=pki.client_cert, client_key_file=pki.client_key))
    with pytest.raises(TLSConfigError, match="RAGTUNE_TLS_CA_FILE=.*cannot read"):
        channel_credentials(TLSSettings(ca_file=tmp_path / "nope.pem"))
    assert server_credentials(TLSSettings()) is None and channel_credentials(TLSSettings()) is None


def test_a_service_with_a_bad_certificate_path_exits_with_the_variable_named(pki, tmp_path):
    """`python -m services.trainer` as deployed: exit 2 and one log line naming the variable, no traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAGTUNE_TLS")}
    env.update(_tls_env(cert_file=tmp_path / "absent.pem", key_file=pki.key))
    env.update(RAGTUNE_TRAINER_PORT=str(free_port()), RAGTUNE_TRAINER_DATA_DIR=str(tmp_path / "data"),
               RAGTUNE_DATABASE_URL=f"sqlite:///{tmp_path / 'cp.sqlite3'}", RAGTUNE_LOG_FORMAT="text")
    proc = subprocess.run([sys.executable, "-m", "services.trainer"], env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert f"RAGTUNE_TLS_CERT_FILE={tmp_path / 'absent.pem'}: cannot read the certificate chain" in output
    assert "Traceback" not in output


def test_http_front_options_serve_the_same_certificate(pki):
    import uvicorn

    assert http_ssl_options(TLSSettings()) == {}
    options = http_ssl_options(TLSSettings(cert_file=pki.cert, key_file=pki.key, client_ca_file=pki.ca))
    assert options["ssl_certfile"] == str(pki.cert) and options["ssl_cert_reqs"] == ssl.CERT_REQUIRED

    async def app(scope, receive, send):  # pragma: no cover - never served: only the TLS context is built
        raise AssertionError

    config = uvicorn.Config(app, **options)
    config.load()
    assert config.ssl is not None and config.ssl.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(TLSConfigError, match="RAGTUNE_TLS_KEY_FILE"):
        http_ssl_options(TLSSettings(cert_file=pki.cert))
