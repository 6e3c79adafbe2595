"""Attacks on who may call what (ragtune/access.py): every public method and route refuses a missing key and a
key without its scope before anything happens; a service-only field cannot be set from the public API; the
gateway's public port serves API keys with RAGTUNE_INTERNAL_TOKEN set (as k8s/base sets it); the internal
services refuse callers without the token, refuse to start exposed with no caller check, and with mutual TLS
accept only the identities the table names. Each attack asserts the refusal and that nothing changed."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import httpx
import pytest
import trustme

from gateway.authorization import StreamRecheck
from gateway.server import GatewayService
from gateway.settings import GatewaySettings
from ragtune import access
from ragtune.access import GRPC_METHODS, HTTP_ROUTES, Identity, Scope
from ragtune.controlplane import Database
from ragtune.controlplane.aliases import AliasStore, Target
from ragtune.controlplane.api_keys import new_key_entry
from ragtune.controlplane.evaluations import EvaluationStore
from ragtune.server import InsecureInternalService, ServiceHost, check_internal_exposure
from ragtune.settings import TLSSettings
from ragtune.tenancy import tenant_metadata
from ragtune.v1 import gateway_pb2, gateway_pb2_grpc, generator_pb2, retriever_pb2, trainer_pb2, trainer_pb2_grpc
from services.trainer.server import TrainerService
from services.trainer.settings import TrainerSettings
from tests.grpc_support import InProcessServer, free_port

TOKEN = "internal-token-for-tests-0123456789abcdef"
_SERVICES = {
    "ragtune.v1.GatewayService": gateway_pb2, "ragtune.v1.RetrieverService": retriever_pb2,
    "ragtune.v1.GeneratorService": generator_pb2, "ragtune.v1.TrainerService": trainer_pb2,
}


def _auth(key: str):
    return (("authorization", f"Bearer {key}"),)


def _all_methods() -> dict[str, object]:
    found = {}
    for name, module in _SERVICES.items():
        service = module.DESCRIPTOR.services_by_name[name.rsplit(".", 1)[1]]
        for method in service.methods:
            found[f"/{name}/{method.name}"] = method
    return found


# ---- the table itself ---------------------------------------------------------------------------------------

def test_every_rpc_has_exactly_one_row_and_every_row_an_rpc():
    methods = _all_methods()
    assert sorted(set(methods) - set(GRPC_METHODS)) == [], "RPCs with no access rule"
    assert sorted(set(GRPC_METHODS) - set(methods)) == [], "access rules for RPCs that do not exist"
    for name, rule in GRPC_METHODS.items():
        internal = access.service_of(name) in access.INTERNAL_SERVICES
        assert rule.internal == internal, name
        assert rule.streams or not methods[name].server_streaming or internal, f"{name} streams but is not marked"


def test_every_http_route_has_exactly_one_row_and_every_row_a_route():
    from gateway.http.app import build_app

    app = build_app(SimpleNamespace())
    routes = {(m, r.path) for r in app.routes for m in (r.methods or ()) if m != "HEAD"}
    assert routes == set(HTTP_ROUTES)
    assert all(not rule.internal for rule in HTTP_ROUTES.values())


def test_internal_callers_follow_the_call_graph():
    trainer = access.callers_of(["ragtune.v1.TrainerService"])
    retriever = access.callers_of(["ragtune.v1.RetrieverService"])
    assert trainer == {Identity.GATEWAY}
    assert retriever == {Identity.GATEWAY, Identity.TRAINER}
    assert Identity.GENERATOR not in retriever | trainer
    assert access.identity_of_san("gateway.ragtune.svc.cluster.local") is Identity.GATEWAY
    assert access.identity_of_san("intruder.example") is None


# ---- the gateway's public API, configured as k8s/base configures it ------------------------------------------

@pytest.fixture(scope="module")
def gateway(tmp_path_factory, postgres_server):
    """A real gateway on the real PostgreSQL with RAGTUNE_INTERNAL_TOKEN set (k8s/base/gateway.yaml sets it) and
    dead downstream services; keys of each scope for tenant acme and an admin key for tenant other."""
    from tests.database_support import fresh_database

    keys, entries = {}, []
    for scope in ("read", "ingest", "train", "admin"):
        keys[scope], entry = new_key_entry("acme", [scope])
        entries.append(entry)
    keys["read+train"], entry = new_key_entry("acme", ["read", "train"])
    entries.append(entry)
    keys["other"], entry = new_key_entry("other", ["admin"])
    entries.append(entry)
    dead = f"127.0.0.1:{free_port()}"
    with fresh_database(postgres_server) as url:
        settings = GatewaySettings(port=0, http_port=0, api_keys=json.dumps({"keys": entries}),
                                   retriever_address=dead, generator_address=dead, trainer_address=dead,
                                   evaluation_workers=0, RAGTUNE_INTERNAL_TOKEN=TOKEN, RAGTUNE_DATABASE_URL=url)
        with InProcessServer(GatewayService, settings, "gateway") as server:
            channel = grpc.insecure_channel(server.address)
            db = Database(url)
            yield SimpleNamespace(stub=gateway_pb2_grpc.GatewayServiceStub(channel), channel=channel, keys=keys,
                                  http=f"http://127.0.0.1:{server.service.http_port}", db=db)
            db.dispose()
            channel.close()


def test_public_port_serves_api_keys_with_the_internal_token_set(gateway):
    reply = gateway.stub.ListEvaluations(gateway_pb2.ListEvaluationsRequest(), metadata=_auth(gateway.keys["read"]),
                                         timeout=10)
    assert list(reply.evaluations) == []
    listed = gateway.stub.ListApiKeys(gateway_pb2.ListApiKeysRequest(), metadata=_auth(gateway.keys["admin"]),
                                      timeout=10)
    assert {k.tenant for k in listed.api_keys} == {"acme"}  # its own tenant's keys only


def test_the_internal_token_is_no_key_to_the_public_api(gateway):
    with pytest.raises(grpc.RpcError) as err:
        gateway.stub.ListEvaluations(gateway_pb2.ListEvaluationsRequest(),
                                     metadata=tenant_metadata("acme", TOKEN), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _call(channel: grpc.Channel, method: str, key: str | None) -> grpc.RpcError:
    """Calls `method` with an empty request (raw bytes: no stub needed) and returns the refusal."""
    streaming = GRPC_METHODS[method].streams or _all_methods()[method].server_streaming
    client_streaming = _all_methods()[method].client_streaming
    metadata = _auth(key) if key else None
    ident = lambda b: b  # noqa: E731
    if client_streaming:
        call = channel.stream_unary(method, request_serializer=ident, response_deserializer=ident)
        call(iter([b""]), metadata=metadata, timeout=10)
    elif streaming:
        call = channel.unary_stream(method, request_serializer=ident, response_deserializer=ident)
        list(call(b"", metadata=metadata, timeout=10))
    else:
        call = channel.unary_unary(method, request_serializer=ident, response_deserializer=ident)
        call(b"", metadata=metadata, timeout=10)
    raise AssertionError(f"{method} answered")


_PUBLIC = sorted(m for m, r in GRPC_METHODS.items() if not r.internal)


@pytest.mark.parametrize("method", _PUBLIC)
def test_every_public_rpc_refuses_a_missing_and_a_wrong_key(gateway, method):
    for key, code in ((None, grpc.StatusCode.UNAUTHENTICATED), ("rt_not-a-key", grpc.StatusCode.UNAUTHENTICATED)):
        with pytest.raises(grpc.RpcError) as err:
            _call(gateway.channel, method, key)
        assert err.value.code() == code, (method, key)


@pytest.mark.parametrize("method", [m for m in _PUBLIC if GRPC_METHODS[m].scope is not Scope.READ])
def test_every_public_rpc_refuses_a_key_without_its_scope(gateway, method):
    scope = GRPC_METHODS[method].scope
    wrong = "read" if scope is not Scope.ADMIN else "train"
    with pytest.raises(grpc.RpcError) as err:
        _call(gateway.channel, method, gateway.keys[wrong])
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert f"'{scope.value}' scope" in err.value.details()


def test_a_read_key_cannot_promote_through_gate_run(gateway):
    """The reported attack: CreateEvaluation (scope read) with the trainer's gate_run moved an alias."""
    aliases = AliasStore(gateway.db)
    aliases.set("acme", "jeopardy-style", "prod", [Target(2, 100)], actor="test", reason="setup")
    before = aliases.get("acme", "jeopardy-style", "prod")
    spec = gateway_pb2.EvaluationSpec(eval_set=b'{"question": "q", "answer": "a"}\n')
    spec.gate_run.CopyFrom(gateway_pb2.GateRun(job_id="job-1", adapter="jeopardy-style", candidate_version=1,
                                               incumbent_version=0,
                                               gate=trainer_pb2.PromotionGate(alias="prod", margin=-2)))
    for key in ("read", "admin"):  # no API key may set it, whatever its scopes
        with pytest.raises(grpc.RpcError) as err:
            gateway.stub.CreateEvaluation(gateway_pb2.CreateEvaluationRequest(spec=spec),
                                          metadata=_auth(gateway.keys[key]), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "spec.gate_run" in err.value.details()
    assert EvaluationStore(gateway.db).list("acme") == []
    after = aliases.get("acme", "jeopardy-style", "prod")
    assert (after.targets, after.revision) == (before.targets, before.revision)


def test_cancelling_an_evaluation_needs_the_scope_that_created_it(gateway):
    spec = gateway_pb2.EvaluationSpec(eval_set=b'{"question": "q", "answer": "a"}\n', collection="docs")
    spec.knowledge_update.eval_set = b'{"question": "q", "answer": "a"}\n'
    store = EvaluationStore(gateway.db)
    record = store.create("acme", spec.SerializeToString(), {})
    with pytest.raises(grpc.RpcError) as err:
        gateway.stub.CancelEvaluation(gateway_pb2.CancelEvaluationRequest(id=record.id),
                                      metadata=_auth(gateway.keys["read"]), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert store.get(record.id, "acme").state == record.state
    # Another tenant's admin cannot even see it.
    with pytest.raises(grpc.RpcError) as err:
        gateway.stub.CancelEvaluation(gateway_pb2.CancelEvaluationRequest(id=record.id),
                                      metadata=_auth(gateway.keys["other"]), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert store.get(record.id, "acme").state == record.state
    reply = gateway.stub.CancelEvaluation(gateway_pb2.CancelEvaluationRequest(id=record.id),
                                          metadata=_auth(gateway.keys["read+train"]), timeout=20)
    assert reply.evaluation.state == gateway_pb2.EVALUATION_STATE_CANCELLED


@pytest.mark.parametrize("route", sorted(HTTP_ROUTES))
def test_every_http_route_refuses_a_missing_key_and_a_key_without_its_scope(gateway, route):
    method, path = route
    url = gateway.http + path.replace("{model:path}", "m").replace("{job_id}", "ftjob-x")
    assert httpx.request(method, url, json={}, timeout=10).status_code == 401
    scope = HTTP_ROUTES[route].scope
    if scope is not Scope.READ:
        reply = httpx.request(method, url, json={}, timeout=10, headers={"Authorization": f"Bearer {gateway.keys['read']}"})
        assert reply.status_code == 403, route
        assert f"'{scope.value}' scope" in reply.json()["error"]["message"]


# ---- the internal services -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def guarded_trainer(tmp_path_factory):
    data = tmp_path_factory.mktemp("trainer")
    settings = TrainerSettings(port=0, data_dir=data, RAGTUNE_DATABASE_URL=f"sqlite:///{data / 'cp.sqlite3'}",
                               RAGTUNE_INTERNAL_TOKEN=TOKEN)
    with InProcessServer(TrainerService, settings, "trainer") as server:
        channel = grpc.insecure_channel(server.address)
        yield SimpleNamespace(stub=trainer_pb2_grpc.TrainerServiceStub(channel), address=server.address)
        channel.close()


def test_internal_service_believes_no_tenant_header_without_the_token(guarded_trainer):
    guarded_trainer = guarded_trainer.stub
    request = trainer_pb2.ListAdaptersRequest()
    for metadata in (tenant_metadata("acme"), tenant_metadata("acme", "wrong-token")):
        with pytest.raises(grpc.RpcError) as err:
            guarded_trainer.ListAdapters(request, metadata=metadata, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Streams are refused before a message is read, too.
    with pytest.raises(grpc.RpcError) as err:
        guarded_trainer.UploadDataset(iter([trainer_pb2.UploadDatasetRequest()]), metadata=tenant_metadata("acme"),
                                      timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert list(guarded_trainer.ListAdapters(request, metadata=tenant_metadata("acme", TOKEN), timeout=10).adapters) == []


def test_internal_service_refuses_to_serve_beyond_loopback_with_no_caller_check(tmp_path):
    data = tmp_path / "trainer"
    for host in ("0.0.0.0", "10.1.2.3", "::"):
        settings = TrainerSettings(host=host, port=0, data_dir=data)
        with pytest.raises(InsecureInternalService, match="RAGTUNE_INTERNAL_TOKEN"):
            check_internal_exposure(settings, TLSSettings(), "trainer")
    check_internal_exposure(TrainerSettings(host="0.0.0.0", port=0, data_dir=data, RAGTUNE_INTERNAL_TOKEN=TOKEN),
                            TLSSettings(), "trainer")
    check_internal_exposure(TrainerSettings(host="127.0.0.1", port=0, data_dir=data), TLSSettings(), "trainer")
    # Through the host, as `python -m services.trainer` starts it: refused before anything is bound.
    exposed = TrainerSettings(host="0.0.0.0", port=0, data_dir=data)

    async def start() -> ServiceHost:
        host = ServiceHost(TrainerService(exposed), exposed, name="trainer")
        with pytest.raises(InsecureInternalService):
            await host.start()
        return host

    assert asyncio.run(start()).port is None


def _pem(path: Path, *blobs) -> Path:
    path.write_bytes(b"".join(b.bytes() for b in blobs))
    return path


@pytest.fixture(scope="module")
def mtls_pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    out = SimpleNamespace(ca=_pem(folder / "ca.pem", ca.cert_pem), cert=_pem(folder / "s.pem", *server.cert_chain_pems),
                          key=_pem(folder / "s.key", server.private_key_pem))
    for who in ("gateway", "generator"):
        cert = ca.issue_cert(f"{who}.ragtune.svc", f"{who}.ragtune.svc.cluster.local")
        setattr(out, who, (_pem(folder / f"{who}.pem", *cert.cert_chain_pems),
                           _pem(folder / f"{who}.key", cert.private_key_pem)))
    return out


def test_mtls_accepts_only_the_identities_the_table_names(mtls_pki, tmp_path, monkeypatch):
    """A certificate the CA signed for the generator cannot call the trainer; the gateway's can."""
    for var, value in (("CERT_FILE", mtls_pki.cert), ("KEY_FILE", mtls_pki.key), ("CLIENT_CA_FILE", mtls_pki.ca)):
        monkeypatch.setenv(f"RAGTUNE_TLS_{var}", str(value))
    settings = TrainerSettings(port=0, data_dir=tmp_path, RAGTUNE_DATABASE_URL=f"sqlite:///{tmp_path / 'cp.sqlite3'}")
    with InProcessServer(TrainerService, settings, "trainer") as server:
        def stub(who):
            cert, key = getattr(mtls_pki, who)
            credentials = grpc.ssl_channel_credentials(mtls_pki.ca.read_bytes(), key.read_bytes(), cert.read_bytes())
            return grpc.secure_channel(f"localhost:{server.port}", credentials)

        with stub("generator") as channel:
            with pytest.raises(grpc.RpcError) as err:
                trainer_pb2_grpc.TrainerServiceStub(channel).ListAdapters(
                    trainer_pb2.ListAdaptersRequest(), metadata=tenant_metadata("acme"), timeout=10)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "generator.ragtune.svc" in err.value.details()
        with stub("gateway") as channel:
            reply = trainer_pb2_grpc.TrainerServiceStub(channel).ListAdapters(
                trainer_pb2.ListAdaptersRequest(), metadata=tenant_metadata("acme"), timeout=10)
            assert list(reply.adapters) == []


def test_an_open_stream_stops_when_its_key_is_revoked(gateway):
    admin = _auth(gateway.keys["admin"])
    created = gateway.stub.CreateApiKey(gateway_pb2.CreateApiKeyRequest(scopes=["read"], name="watcher"),
                                        metadata=admin, timeout=10)
    _wait_for_key(gateway, created.key, valid=True)
    record = EvaluationStore(gateway.db).create("acme", gateway_pb2.EvaluationSpec(
        eval_set=b'{"question": "q", "answer": "a"}\n').SerializeToString(), {})
    stream = gateway.stub.WatchEvaluation(gateway_pb2.WatchEvaluationRequest(id=record.id),
                                          metadata=_auth(created.key), timeout=60)
    first = next(stream)
    assert first.evaluation.state == gateway_pb2.EVALUATION_STATE_QUEUED
    gateway.stub.RevokeApiKey(gateway_pb2.RevokeApiKeyRequest(id=created.api_key.id), metadata=admin, timeout=10)
    _wait_for_key(gateway, created.key, valid=False)
    time.sleep(StreamRecheck.RECHECK_S)
    gateway.stub.CancelEvaluation(gateway_pb2.CancelEvaluationRequest(id=record.id), metadata=admin, timeout=20)
    with pytest.raises(grpc.RpcError) as err:
        for _ in stream:  # the change would be streamed to a valid key; the revoked one gets the refusal
            pass
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _wait_for_key(gateway, key: str, *, valid: bool) -> None:
    """Until the replica's key view (refreshed every RAGTUNE_GATEWAY_KEY_REFRESH_S) accepts or refuses `key`."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            gateway.stub.ListEvaluations(gateway_pb2.ListEvaluationsRequest(), metadata=_auth(key), timeout=5)
            if valid:
                return
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            if not valid:
                return
        time.sleep(0.2)
    raise AssertionError(f"the key never became {'valid' if valid else 'invalid'}")


def test_a_gateway_whose_token_the_services_refuse_is_a_deployment_fault_not_the_clients(guarded_trainer, tmp_path):
    """The client's key is fine; the gateway's own token is not the trainer's: the client must not be told its
    credentials failed (UNAUTHENTICATED), and no internal detail leaks."""
    key, entry = new_key_entry("acme", ["read"])
    dead = f"127.0.0.1:{free_port()}"
    trainer_address = guarded_trainer.address
    settings = GatewaySettings(port=0, http_port=-1, api_keys=json.dumps({"keys": [entry]}), retriever_address=dead,
                               generator_address=dead, trainer_address=trainer_address, evaluation_workers=0,
                               RAGTUNE_INTERNAL_TOKEN="not-the-trainers-token",
                               RAGTUNE_DATABASE_URL=f"sqlite:///{tmp_path / 'gw.sqlite3'}")
    with InProcessServer(GatewayService, settings, "gateway") as server, grpc.insecure_channel(server.address) as ch:
        with pytest.raises(grpc.RpcError) as err:
            gateway_pb2_grpc.GatewayServiceStub(ch).ListAdapters(
                gateway_pb2.GatewayServiceListAdaptersRequest(request=trainer_pb2.ListAdaptersRequest()),
                metadata=_auth(key), timeout=10)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "service credentials were refused" in err.value.details() and "token" not in err.value.details()
