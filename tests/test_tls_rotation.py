"""Certificates rotated under running servers (cert-manager rewrites the mounted Secret before a 90-day
certificate expires): the gRPC server and the gateway's HTTPS front serve the new files to new connections
without a restart, and a half-written rotation keeps the old certificate serving."""

from __future__ import annotations

import json
import ssl
import time
from pathlib import Path

import grpc
import httpx
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.server import GatewayService
from gateway.settings import GatewaySettings
from ragtune.controlplane.api_keys import new_key_entry
from services.trainer.server import TrainerService
from services.trainer.settings import TrainerSettings
from tests.grpc_support import InProcessServer, free_port


def _write(path: Path, *blobs) -> Path:
    path.write_bytes(b"".join(b.bytes() for b in blobs))
    return path


def _issue(ca: trustme.CA, folder: Path, name: str) -> tuple[Path, Path, Path]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    return (_write(folder / f"{name}-ca.pem", ca.cert_pem), _write(folder / f"{name}.pem", *cert.cert_chain_pems),
            _write(folder / f"{name}.key", cert.private_key_pem))


def _grpc_ok(port: int, ca: Path) -> bool:
    credentials = grpc.ssl_channel_credentials(ca.read_bytes())
    with grpc.secure_channel(f"localhost:{port}", credentials) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
            return True
        except grpc.RpcError:
            return False


def _until(predicate, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.3)
    return False


@pytest.fixture
def serving_files(tmp_path):
    """The files a server is configured with (what the Secret mount holds), issued by a first CA."""
    old_ca, cert, key = _issue(trustme.CA(), tmp_path, "old")
    live_cert, live_key = tmp_path / "tls.crt", tmp_path / "tls.key"
    live_cert.write_bytes(cert.read_bytes())
    live_key.write_bytes(key.read_bytes())
    return tmp_path, old_ca, live_cert, live_key


def test_grpc_server_serves_a_rotated_certificate_without_restart(serving_files, monkeypatch):
    folder, old_ca, live_cert, live_key = serving_files
    monkeypatch.setenv("RAGTUNE_TLS_CERT_FILE", str(live_cert))
    monkeypatch.setenv("RAGTUNE_TLS_KEY_FILE", str(live_key))
    settings = TrainerSettings(port=0, data_dir=folder / "t", RAGTUNE_DATABASE_URL=f"sqlite:///{folder / 'cp.db'}")
    with InProcessServer(TrainerService, settings, "trainer") as server:
        assert _grpc_ok(server.port, old_ca)
        new_ca, cert, key = _issue(trustme.CA(), folder, "new")
        # Half a rotation (a new certificate, the old key): refused, the old certificate keeps serving.
        live_cert.write_bytes(cert.read_bytes())
        time.sleep(1.2)
        assert _grpc_ok(server.port, old_ca)
        assert not _grpc_ok(server.port, new_ca)
        live_key.write_bytes(key.read_bytes())
        assert _until(lambda: _grpc_ok(server.port, new_ca)), "the rotated certificate was never served"
        assert not _grpc_ok(server.port, old_ca)


def test_https_front_serves_a_rotated_certificate_without_restart(serving_files, monkeypatch):
    folder, old_ca, live_cert, live_key = serving_files
    monkeypatch.setenv("RAGTUNE_TLS_CERT_FILE", str(live_cert))
    monkeypatch.setenv("RAGTUNE_TLS_KEY_FILE", str(live_key))
    _, entry = new_key_entry("acme", ["read"])
    dead = f"127.0.0.1:{free_port()}"
    settings = GatewaySettings(port=0, http_port=0, api_keys=json.dumps({"keys": [entry]}), retriever_address=dead,
                               generator_address=dead, trainer_address=dead, evaluation_workers=0,
                               RAGTUNE_DATABASE_URL=f"sqlite:///{folder / 'gw.db'}")
    with InProcessServer(GatewayService, settings, "gateway") as server:
        url = f"https://localhost:{server.service.http_port}/v1/models"

        def answers(ca: Path) -> bool:
            try:
                httpx.get(url, verify=ssl.create_default_context(cafile=str(ca)), timeout=3)
                return True
            except httpx.ConnectError:
                return False

        assert answers(old_ca)
        new_ca, cert, key = _issue(trustme.CA(), folder, "new")
        live_key.write_bytes(key.read_bytes())
        live_cert.write_bytes(cert.read_bytes())
        assert _until(lambda: answers(new_ca)), "the rotated certificate was never served over HTTPS"
        assert not answers(old_ca)
