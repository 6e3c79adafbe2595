"""Attacks on the gateway's view of the API keys, on SQLite and the real PostgreSQL: a hostile or broken
row in the keys table, a control-plane database that stops answering (a pool that times out, a database
that refuses connections), and a key taken out of the bootstrap keys file. Each asserts the refusal and
that nothing else changed: the refresher keeps running, the other keys keep working, and keys made
through the API are never touched by the file."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import grpc
import httpx
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from pydantic import ValidationError
from sqlalchemy import Text, cast, create_engine, insert, select, text

from gateway.auth import STALENESS_METRIC, KeyRefresher, KeyRing, register_staleness_gauge
from gateway.server import GatewayService
from gateway.settings import GatewaySettings
from ragtune.controlplane import Database
from ragtune.controlplane.api_keys import (
    ActiveKey, ApiKeyStore, hash_key, load_key_file, new_key_entry, parse_key_entries,
)
from ragtune.controlplane.schema import api_keys
from ragtune.errors import Unauthenticated, Unavailable
from ragtune.server import HostSettings
from ragtune.v1 import gateway_pb2, gateway_pb2_grpc
from tests.grpc_support import InProcessServer, free_port

ATTEMPT_TIMEOUT_S = 10.0  # one refresh attempt, on a busy 2-core machine


def _bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def _rows(database: Database) -> dict[str, tuple]:
    """Every key row as stored, to show what an attack did not change."""
    with database.read() as c:
        rows = c.execute(select(api_keys.c.id, api_keys.c.sha256, api_keys.c.tenant,
                                cast(api_keys.c.scopes, Text).label("scopes"), api_keys.c.source,
                                api_keys.c.revoke_time)).all()
    return {r.id: (r.sha256, r.tenant, r.scopes, r.source, r.revoke_time) for r in rows}


def _insert_row(database: Database, key_id: str, sha256: str, scopes, tenant: str = "acme") -> None:
    """A row written behind the API's back (by hand, or by a newer version with a new scope)."""
    with database.transaction() as c:
        c.execute(insert(api_keys).values(id=key_id, sha256=sha256, tenant=tenant, scopes=scopes, name="hand",
                                          prefix="", source="api", create_time=time.time(), revoke_time=None))


async def _attempts(refresher: KeyRefresher, count: int) -> None:
    for _ in range(count):
        await asyncio.wait_for(refresher.next_attempt(), ATTEMPT_TIMEOUT_S)


async def _until(refresher: KeyRefresher, done, attempts: int = 200) -> None:
    """Waits refresh attempt by refresh attempt (each bounded) until `done()` holds."""
    for _ in range(attempts):
        if done():
            return
        await asyncio.wait_for(refresher.next_attempt(), ATTEMPT_TIMEOUT_S)
    raise AssertionError(f"not reached after {attempts} refresh attempts")


def test_rows_that_cannot_be_keys_are_skipped_and_the_refresher_keeps_running(database, caplog):
    store = ApiKeyStore(database)
    good_key, good = store.create("acme", ["read"])
    rival_key, rival = store.create("rival", ["admin"])
    root_key = "rt_hand-made-root-key"
    _insert_row(database, "key-unknown-scope", hash_key(root_key), ["read", "root"])
    _insert_row(database, "key-bad-digest", "zz" * 32, ["admin"])
    _insert_row(database, "key-scope-string", hash_key("rt_scopes-as-a-string"), "admin")
    _insert_row(database, "key-bad-tenant", hash_key("rt_bad-tenant"), ["admin"], tenant="Not A Tenant")
    hostile_rows = ["key-unknown-scope", "key-bad-digest", "key-scope-string", "key-bad-tenant"]
    if database.is_sqlite:  # PostgreSQL's json column refuses text that is not JSON; SQLite stores it
        _insert_row(database, "key-not-json", hash_key("rt_not-json"), ["admin"])
        with database.transaction() as c:
            c.execute(text("UPDATE api_keys SET scopes = 'read,admin' WHERE id = 'key-not-json'"))
        hostile_rows.append("key-not-json")
    before = _rows(database)

    async def scenario():
        ring = KeyRing(max_staleness_s=30)
        refresher = KeyRefresher(store, ring, period_s=0.05)
        await refresher.load()  # the load at start: one bad row used to fail it (and so the gateway's start)
        refresher.start()
        await _attempts(refresher, 3)
        assert refresher.running and refresher.failures == 0
        assert {k.id for k in refresher.unusable} == set(hostile_rows)
        assert ring.authenticate(_bearer(good_key)).tenant == "acme"
        for hostile in (root_key, "rt_scopes-as-a-string", "rt_bad-tenant", "rt_not-json"):
            with pytest.raises(Unauthenticated, match="invalid API key"):
                ring.authenticate(_bearer(hostile))
        # A revocation made after the bad rows is still seen: the refresh did not die on them.
        await asyncio.to_thread(store.revoke, "acme", good.id)
        await _until(refresher, lambda: len(ring) == 1)
        with pytest.raises(Unauthenticated, match="invalid API key"):
            ring.authenticate(_bearer(good_key))
        assert ring.authenticate(_bearer(rival_key)).key_id == rival.id
        assert refresher.running and refresher.failures == 0
        await refresher.stop()

    with caplog.at_level(logging.WARNING, logger="gateway.auth"):
        asyncio.run(scenario())
    # Each bad row is logged once, by id and reason, not once every refresh.
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert sorted(m.split()[2] for m in skipped) == sorted(hostile_rows)
    assert any("unknown scope(s) ['root']" in m for m in skipped)
    after = _rows(database)
    assert after[good.id][4] is not None  # the one change made: the revocation
    del before[good.id], after[good.id]
    assert after == before


def test_the_ring_itself_skips_a_key_it_cannot_use_and_keeps_the_others():
    # Defence in depth: keys reach the ring from other places than the store's checked load.
    good_key, entry = new_key_entry("acme", ["read"])
    ring = KeyRing()
    skipped = ring.replace([
        ActiveKey(hash_key("rt_root"), "acme", ("read", "root"), "key-root"),
        ActiveKey("ab" * 16, "acme", ("admin",), "key-short-digest"),
        ActiveKey("not hex" * 9, "acme", ("admin",), "key-not-hex"),
        ActiveKey(entry["sha256"], "acme", ("read",), "key-good"),
    ])
    assert [k.id for k in skipped] == ["key-root", "key-short-digest", "key-not-hex"] and len(ring) == 1
    assert ring.authenticate(_bearer(good_key)).key_id == "key-good"
    with pytest.raises(Unauthenticated, match="invalid API key"):
        ring.authenticate(_bearer("rt_root"))


def _narrow_pool(database: Database) -> None:
    """One connection and a 0.2 s wait for it: holding that connection makes every load fail with
    sqlalchemy's pool TimeoutError, the error that used to end the refresh task for good."""
    database.engine.dispose()
    threads = {"check_same_thread": False} if database.is_sqlite else {}  # loads run in worker threads
    database.engine = create_engine(database.url, pool_size=1, max_overflow=0, pool_timeout=0.2, connect_args=threads)


def test_a_database_that_stops_answering_is_survived_then_the_stale_keys_are_refused(database, database_url):
    store = ApiKeyStore(database)
    kept_key, kept = store.create("acme", ["admin"])
    revoked_key, revoked = store.create("acme", ["read"])
    _narrow_pool(database)
    admin = Database(database_url)  # another replica's connection: it can still write while this one cannot read
    reader = InMemoryMetricReader()
    register_staleness_gauge(MeterProvider(metric_readers=[reader]).get_meter("test"))

    def gauge_values() -> list[float]:
        data = reader.get_metrics_data()
        if data is None:
            return []
        return [point.value for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
                if m.name == STALENESS_METRIC for point in m.data.data_points]

    async def scenario():
        ring = KeyRing(max_staleness_s=3.0, retry_after_s=0.05)
        refresher = KeyRefresher(store, ring, period_s=0.05)
        await refresher.load()
        refresher.start()
        held = database.engine.connect()  # the pool is exhausted from now on
        try:
            await _until(refresher, lambda: refresher.failures >= 1)
            assert "TimeoutError" in refresher.last_error and refresher.running
            if ring.age_s < 3.0:  # inside the limit the last loaded keys still serve
                assert ring.authenticate(_bearer(revoked_key)).key_id == revoked.id
            await asyncio.to_thread(ApiKeyStore(admin).revoke, "acme", revoked.id)
            await _until(refresher, lambda: ring.stale_reason() is not None)
            first_age = refresher.age_s
            assert first_age > 3.0 and refresher.running
            for key in (revoked_key, kept_key):  # nothing is served on the stale view, valid keys included
                with pytest.raises(Unavailable) as refused:
                    ring.authenticate(_bearer(key))
                assert "API keys could not be refreshed for" in refused.value.message
                assert "(limit RAGTUNE_GATEWAY_KEY_MAX_STALENESS_S=3 s)" in refused.value.message
                assert refused.value.retry_after_s == 0.05
            with pytest.raises(Unauthenticated, match="missing API key"):  # a malformed call is still told so
                ring.authenticate([])
            await _until(refresher, lambda: refresher.failures >= 3)
            assert refresher.age_s > first_age and max(gauge_values()) > 3.0
        finally:
            held.close()
        await _until(refresher, lambda: refresher.failures == 0)
        assert refresher.stale_reason() is None and refresher.age_s < 3.0 and refresher.running
        with pytest.raises(Unauthenticated, match="invalid API key"):  # the revocation made during the outage
            ring.authenticate(_bearer(revoked_key))
        assert ring.authenticate(_bearer(kept_key)).key_id == kept.id
        await refresher.stop()
        assert max(gauge_values(), default=0.0) < 3.0  # a stopped refresher is no longer reported

    try:
        asyncio.run(scenario())
    finally:
        admin.dispose()
    assert [(k.id, k.revoked) for k in store.list("acme", include_revoked=True)] == [(kept.id, False),
                                                                                     (revoked.id, True)]


def test_the_staleness_limit_is_validated():
    for bad in (0, -5):
        with pytest.raises(ValidationError, match="key_max_staleness_s"):
            GatewaySettings(key_max_staleness_s=bad)
    with pytest.raises(ValidationError, match="at least twice RAGTUNE_GATEWAY_KEY_REFRESH_S"):
        GatewaySettings(key_refresh_s=10, key_max_staleness_s=15)
    assert GatewaySettings().key_max_staleness_s >= 10 * GatewaySettings().key_refresh_s


# --- the whole gateway: health, both fronts, and the bootstrap keys file across restarts -------------

def _gateway_settings(database_url: str, **overrides) -> GatewaySettings:
    dead = f"127.0.0.1:{free_port()}"
    return GatewaySettings(port=0, http_port=0, RAGTUNE_DATABASE_URL=database_url, evaluation_workers=0,
                           retriever_address=dead, generator_address=dead, trainer_address=dead, **overrides)


def _set_connections(server_url: str, database_url: str, allowed: bool) -> None:
    """Makes the database refuse (or accept again) every new connection, and drops the open ones."""
    import psycopg

    name = database_url.rsplit("/", 1)[1]
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS {"true" if allowed else "false"}')
        if not allowed:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))


def _health(address: str) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="ragtune.v1.GatewayService"), timeout=5)
    return reply.status


def _wait(predicate, timeout_s: float = 30.0, what: str = "") -> None:
    """A bounded wait on state another thread changes (the gateway's own loop)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.05)


def test_a_gateway_whose_database_refuses_connections_refuses_keys_on_both_fronts_then_recovers(
        postgres_server, tmp_path):
    from grpc_health.v1 import health_pb2

    from tests.database_support import fresh_database

    admin_key, admin_entry = new_key_entry("acme", ["admin"])
    with fresh_database(postgres_server) as url:
        settings = _gateway_settings(url, api_keys=json.dumps({"keys": [admin_entry]}), key_refresh_s=0.1,
                                     key_max_staleness_s=1.5)
        with InProcessServer(GatewayService, settings, "gateway",
                             host_settings=HostSettings(health_check_interval_s=0.1)) as gateway:
            stub = gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(gateway.address))
            http = f"http://127.0.0.1:{gateway.service.http_port}"
            listed = stub.ListApiKeys(gateway_pb2.ListApiKeysRequest(), metadata=_bearer(admin_key))
            assert [k.source for k in listed.api_keys] == ["file"]
            _set_connections(postgres_server, url, allowed=False)
            try:
                _wait(lambda: _health(gateway.address) == health_pb2.HealthCheckResponse.NOT_SERVING, what="not ready")
                keys = gateway.service.keys
                assert keys.running and keys.failures >= 1 and keys.age_s > 1.5
                with pytest.raises(grpc.RpcError) as refused:
                    stub.ListApiKeys(gateway_pb2.ListApiKeysRequest(), metadata=_bearer(admin_key), timeout=10)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "API keys could not be refreshed for" in refused.value.details()
                assert "RAGTUNE_GATEWAY_KEY_MAX_STALENESS_S=1.5 s" in refused.value.details()
                reply = httpx.get(f"{http}/v1/models", headers={"authorization": f"Bearer {admin_key}"}, timeout=10)
                assert reply.status_code == 503 and "retry-after" in reply.headers
                assert "API keys could not be refreshed for" in reply.json()["error"]["message"]
            finally:
                _set_connections(postgres_server, url, allowed=True)
            _wait(lambda: _health(gateway.address) == health_pb2.HealthCheckResponse.SERVING, what="ready again")
            assert gateway.service.keys.failures == 0 and gateway.service.keys.running
            again = stub.ListApiKeys(gateway_pb2.ListApiKeysRequest(include_revoked=True), metadata=_bearer(admin_key))
            assert [(k.id, k.revoke_time) for k in again.api_keys] == [(k.id, 0.0) for k in listed.api_keys]
            reply = httpx.get(f"{http}/v1/models", headers={"authorization": "Bearer rt_not-a-key"}, timeout=10)
            assert reply.status_code == 401


def _write_keys(path, *entries) -> None:
    path.write_text(json.dumps({"keys": list(entries)}))


def test_a_key_taken_out_of_the_keys_file_is_refused_after_a_restart_and_api_keys_are_untouched(
        database_url, tmp_path):
    keys_file = tmp_path / "api-keys.json"
    admin_key, admin_entry = new_key_entry("acme", ["admin"])
    dropped_key, dropped_entry = new_key_entry("acme", ["read"])
    rival_key, rival_entry = new_key_entry("rival", ["read"])  # the file's only key of its tenant
    _write_keys(keys_file, admin_entry, dropped_entry, rival_entry)

    def listed(stub, key: str) -> dict[str, tuple]:
        reply = stub.ListApiKeys(gateway_pb2.ListApiKeysRequest(include_revoked=True), metadata=_bearer(key))
        return {k.id: (k.source, tuple(k.scopes), k.revoke_time) for k in reply.api_keys}

    with InProcessServer(GatewayService, _gateway_settings(database_url, api_keys_file=keys_file), "gateway") as gw:
        stub = gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(gw.address))
        made = stub.CreateApiKey(gateway_pb2.CreateApiKeyRequest(scopes=["read"], name="ci"),
                                 metadata=_bearer(admin_key))
        stub.ListEvaluations(gateway_pb2.ListEvaluationsRequest(), metadata=_bearer(dropped_key))
        before = listed(stub, admin_key)
        assert len(before) == 3 and before[made.api_key.id][0] == "api"

    # The hostile change: the file loses two keys (one of them the last of its tenant) and the gateway restarts.
    _write_keys(keys_file, admin_entry)
    with InProcessServer(GatewayService, _gateway_settings(database_url, api_keys_file=keys_file), "gateway") as gw:
        stub = gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(gw.address))
        for key in (dropped_key, rival_key):
            with pytest.raises(grpc.RpcError) as refused:
                stub.ListEvaluations(gateway_pb2.ListEvaluationsRequest(), metadata=_bearer(key))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "invalid API key" in refused.value.details()
        stub.ListEvaluations(gateway_pb2.ListEvaluationsRequest(), metadata=_bearer(made.key))  # API key untouched
        after = listed(stub, admin_key)
        dropped_id = "key-" + hash_key(dropped_key)[:16]
        assert after[dropped_id][2] > 0
        assert {k: v for k, v in after.items() if k != dropped_id} == {
            k: v for k, v in before.items() if k != dropped_id}

    # The same file with the key put back (an old copy) does not revive it; no file configured touches nothing.
    _write_keys(keys_file, admin_entry, dropped_entry)
    for settings in (_gateway_settings(database_url, api_keys_file=keys_file), _gateway_settings(database_url)):
        with InProcessServer(GatewayService, settings, "gateway") as gw:
            stub = gateway_pb2_grpc.GatewayServiceStub(grpc.insecure_channel(gw.address))
            with pytest.raises(grpc.RpcError) as refused:
                stub.ListEvaluations(gateway_pb2.ListEvaluationsRequest(), metadata=_bearer(dropped_key))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert listed(stub, admin_key) == after


def test_applying_the_keys_file_revokes_only_file_keys_it_no_longer_lists(database):
    store = ApiKeyStore(database)
    _, kept = new_key_entry("acme", ["admin"])
    _, gone = new_key_entry("rival", ["read"])
    made_key, made = store.create("rival", ["read"])
    first = store.import_entries(parse_key_entries(json.dumps({"keys": [kept, gone]})))
    assert first.added == 2 and first.revoked == ()
    again = store.import_entries(parse_key_entries(json.dumps({"keys": [kept]})))
    assert again.added == 0 and again.revoked == ("key-" + gone["sha256"][:16],)
    assert {k.sha256 for k in store.active()} == {kept["sha256"], hash_key(made_key)}
    before = _rows(database)
    # An explicitly empty file is the truth too: no file key is left; the API's key stays.
    emptied = store.import_entries(parse_key_entries('{"keys": []}'))
    assert emptied.revoked == ("key-" + kept["sha256"][:16],)
    assert {k.id for k in store.active()} == {made.id}
    after = _rows(database)
    assert {k: v for k, v in after.items() if k != emptied.revoked[0]} == {
        k: v for k, v in before.items() if k != emptied.revoked[0]}


def test_a_keys_file_that_is_not_a_keys_list_stops_the_start_instead_of_revoking(tmp_path):
    assert load_key_file(None, None) is None and load_key_file(None, "") is None  # nothing configured: touch nothing
    for broken in ("", "{}", '{"keys": {}}', "[]", '{"keys": ["not an entry"]}'):
        path = tmp_path / "api-keys.json"
        path.write_text(broken)
        with pytest.raises(ValueError, match=str(path)):
            load_key_file(path, None)
