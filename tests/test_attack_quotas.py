"""Quotas and fairness between tenants, attacked: a tenant or key over its limits is refused with
RESOURCE_EXHAUSTED carrying google.rpc.QuotaFailure and RetryInfo (HTTP 429 + Retry-After) while other
tenants go on; only an admin key of the tenant itself changes its quotas; one tenant's flood waits behind
itself at the generator; the prefix cache is salted per tenant. Against a real gateway on real sockets,
the real PostgreSQL (and SQLite for the store), and the real Redis where one runs."""

from __future__ import annotations

import asyncio
import json
import os
import socket

import grpc
import httpx
import pytest

from gateway.auth import Principal
from gateway.fairness import FairGate, FairGenerator
from gateway.quota_counters import LocalCounters
from gateway.quotas import QuotaAdmission
from ragtune.access import public, Scope
from ragtune.controlplane import Database
from ragtune.controlplane.api_keys import ApiKeyStore, new_key_entry
from ragtune.controlplane.evaluations import EvaluationStore
from ragtune.controlplane.jobs import JobStore
from ragtune.controlplane.quotas import QuotaLimits, QuotaStore
from ragtune.controlplane.schema import datasets
from ragtune.errors import InvalidArgument, NotFound, QuotaExceeded, quota_violations, retry_delay_s
from ragtune.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, generator_pb2

READ_CALL = public(Scope.READ)
STREAM_CALL = public(Scope.READ, streams=True)
GENERATING_CALL = public(Scope.READ, generates=True)
REDIS_URL = os.environ.get("RAGTUNE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


# --- the store, on SQLite and on PostgreSQL -------------------------------------------------------------------

def test_quotas_are_stored_per_tenant_and_key_replaced_whole_and_removed_when_empty(database):
    store = QuotaStore(database)
    keys = ApiKeyStore(database)
    _, acme_key = keys.create("acme", ["read"])
    _, rival_key = keys.create("rival", ["read"])
    assert database.migrate() == "0004"
    assert store.get("acme").limits.empty and store.list("acme") == []

    tenant = store.set("acme", "", QuotaLimits(requests_per_s=2.5, stored_bytes=10 * 2**40), actor="key-admin")
    assert tenant.limits == QuotaLimits(requests_per_s=2.5, stored_bytes=10 * 2**40) and tenant.updated_by == "key-admin"
    store.set("acme", acme_key.id, QuotaLimits(concurrent_streams=1), actor="key-admin")
    assert [(r.key_id, r.limits) for r in store.list("acme")] == [
        ("", tenant.limits), (acme_key.id, QuotaLimits(concurrent_streams=1))]
    # A set replaces the row whole: what it leaves unset returns to the default.
    assert store.set("acme", "", QuotaLimits(queued_jobs=3), actor="a").limits == QuotaLimits(queued_jobs=3)
    assert store.set("acme", acme_key.id, QuotaLimits(), actor="a").limits.empty
    assert [r.key_id for r in store.list("acme")] == [""]

    # Another tenant's key is not there for acme, and nothing is written for it.
    with pytest.raises(NotFound) as caught:
        store.set("acme", rival_key.id, QuotaLimits(requests_per_s=1000.0), actor="a")
    assert "key_id" in caught.value.message
    assert store.list("rival") == [] and store.get("rival", rival_key.id).limits.empty
    with pytest.raises(InvalidArgument) as caught:
        store.set("acme", "", QuotaLimits(requests_per_s=-1.0, queued_jobs=-2), actor="a")
    assert {v.field for v in caught.value.violations} == {"limits.requests_per_s", "limits.queued_jobs"}
    assert store.get("acme").limits == QuotaLimits(queued_jobs=3)
    assert {(r.tenant, r.key_id) for r in store.all()} == {("acme", "")}


def test_the_store_counts_what_the_tenant_holds(database):
    store = QuotaStore(database)
    jobs = JobStore(database)
    evaluations = EvaluationStore(database)
    running, _ = jobs.create("acme", {"adapter_name": "a"})
    done, _ = jobs.create("acme", {"adapter_name": "b"})
    jobs.set_state(done.id, "SUCCEEDED")
    jobs.create("rival", {"adapter_name": "c"})
    evaluations.create("acme", b"spec", {}, lambda t, i: f"evaluations/{t}/{i}")
    with database.transaction() as c:
        c.execute(datasets.insert().values(tenant="acme", name="d1", path="p", size_bytes=1500, sha256="0" * 64,
                                           lines=3, update_time=0.0))
        c.execute(datasets.insert().values(tenant="rival", name="d1", path="p", size_bytes=99, sha256="0" * 64,
                                           lines=3, update_time=0.0))
    assert store.unfinished_jobs("acme") == 1 and store.unfinished_jobs("nobody") == 0
    assert store.unfinished_evaluations("acme") == 1 and store.unfinished_evaluations("rival") == 0
    assert store.stored_bytes("acme") == 1500 and store.stored_bytes("nobody") == 0


# --- admission in this process, and in Redis shared by two replicas ---------------------------------------------

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _admission(clock: Clock, **limits) -> QuotaAdmission:
    return QuotaAdmission(QuotaLimits(**{**dict(requests_per_s=1000.0, generated_tokens_per_min=10**6,
                                                concurrent_streams=100, queued_jobs=100, running_evaluations=10,
                                                stored_bytes=2**40), **limits}),
                          None, burst_s=1.0, counters=LocalCounters(clock))


def _refusal(caught) -> tuple[str, str, float]:
    (violation,) = caught.value.quota_violations
    return violation.subject, violation.description, caught.value.retry_after_s


def test_requests_per_second_are_bounded_per_tenant_and_per_key_and_refill():
    clock = Clock()
    quotas = _admission(clock, requests_per_s=2.0)  # a bucket of 2 (one second of the rate)
    acme = Principal("acme", frozenset({Scope.READ}), "key-a")
    rival = Principal("rival", frozenset({Scope.READ}), "key-r")

    async def scenario():
        await quotas.admit(acme, READ_CALL)
        await quotas.admit(acme, READ_CALL)
        with pytest.raises(QuotaExceeded) as caught:
            await quotas.admit(acme, READ_CALL)
        subject, description, retry = _refusal(caught)
        assert subject == "tenant:acme" and description.startswith("requests_per_s") and retry == pytest.approx(0.5)
        await quotas.admit(rival, READ_CALL)  # another tenant has its own bucket
        clock.now += 0.5
        await quotas.admit(acme, READ_CALL)  # refilled at the rate

        # A key with its own, lower limit is held to it while the tenant still has room.
        quotas.remember(_record("acme", "key-slow", QuotaLimits(requests_per_s=0.1)))
        slow = Principal("acme", frozenset({Scope.READ}), "key-slow")
        clock.now += 10
        await quotas.admit(slow, READ_CALL)
        with pytest.raises(QuotaExceeded) as caught:
            await quotas.admit(slow, READ_CALL)
        assert _refusal(caught)[0] == "key:key-slow"
        await quotas.admit(acme, READ_CALL)  # the tenant's other keys are not held to key-slow's limit

    asyncio.run(scenario())


def _record(tenant: str, key_id: str, limits: QuotaLimits):
    from ragtune.controlplane.quotas import QuotaRecord

    return QuotaRecord(tenant, key_id, limits, 0.0, "test")


def test_open_streams_are_bounded_per_tenant_and_released_once():
    quotas = _admission(Clock(), concurrent_streams=2)
    acme = Principal("acme", frozenset({Scope.READ}), "key-a")

    async def scenario():
        first = await quotas.admit(acme, STREAM_CALL)
        second = await quotas.admit(acme, STREAM_CALL)
        await quotas.admit(acme, READ_CALL)  # a unary call holds no stream
        with pytest.raises(QuotaExceeded) as caught:
            await quotas.admit(acme, STREAM_CALL)
        assert _refusal(caught)[:1] == ("tenant:acme",) and "concurrent_streams: limit 2" in _refusal(caught)[1]
        await quotas.admit(Principal("rival", frozenset(), "key-r"), STREAM_CALL)
        first()
        first()  # released twice (stream end and cancellation both): counts once
        third = await quotas.admit(acme, STREAM_CALL)
        with pytest.raises(QuotaExceeded):
            await quotas.admit(acme, STREAM_CALL)
        second(), third()
        assert quotas.counters.held("streams:t:acme") == 0

    asyncio.run(scenario())


def test_generated_tokens_are_charged_after_the_answer_and_refused_until_they_refill():
    clock = Clock()
    quotas = _admission(clock, generated_tokens_per_min=600)  # 10 tokens a second
    acme = Principal("acme", frozenset({Scope.READ}), "key-a")

    async def scenario():
        await quotas.admit(acme, GENERATING_CALL)
        quotas.charge_tokens("acme", "key-a", 650)  # one long answer may overdraw: it is charged once known
        with pytest.raises(QuotaExceeded) as caught:
            await quotas.admit(acme, GENERATING_CALL)
        subject, description, retry = _refusal(caught)
        assert subject == "tenant:acme" and "generated_tokens_per_min: limit 600" in description
        assert retry == pytest.approx(5.1)  # 50 tokens of debt, then one token, at 10 a second
        await quotas.admit(acme, READ_CALL)  # calls that generate nothing still pass
        await quotas.admit(Principal("rival", frozenset(), "key-r"), GENERATING_CALL)
        clock.now += 5.2
        await quotas.admit(acme, GENERATING_CALL)

    asyncio.run(scenario())


def test_generator_calls_are_charged_with_the_answers_token_count():
    quotas = _admission(Clock(), generated_tokens_per_min=60)
    charged: list[tuple[str, str, int]] = []

    class Generator:  # answers with the generator's own messages
        async def generate(self, request, budget):
            return generator_pb2.GenerateResponse(text="x", usage=common_pb2.TokenUsage(completion_tokens=61))

        async def generate_stream(self, request, budget):
            for delta in ("a", "b", "c"):
                yield generator_pb2.GenerateStreamResponse(delta=delta)

    from gateway.downstream import CallBudget
    import time

    def charge(tenant, key_id, tokens):
        charged.append((tenant, key_id, tokens))
        quotas.charge_tokens(tenant, key_id, tokens)

    fair = FairGenerator(Generator(), FairGate(4), charge)
    budget = CallBudget("acme", time.monotonic() + 30, actor="key-a")

    async def scenario():
        await fair.generate(generator_pb2.GenerateRequest(), budget)
        parts = fair.generate_stream(generator_pb2.GenerateStreamRequest(), budget)
        await parts.__anext__()
        await parts.aclose()  # a stream cut short is charged what it delivered
        with pytest.raises(QuotaExceeded):
            await quotas.admit(Principal("acme", frozenset(), "key-a"), GENERATING_CALL)

    asyncio.run(scenario())
    assert charged == [("acme", "key-a", 61), ("acme", "key-a", 1)]


def _redis_or_skip() -> None:
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=1).close()
    except OSError:
        if os.environ.get("CI"):
            pytest.fail("Redis is required in CI and none answers at 127.0.0.1:6379")
        pytest.skip("no Redis at 127.0.0.1:6379")


def test_two_replicas_share_the_counters_in_redis():
    _redis_or_skip()
    from gateway.quota_counters import RedisCounters

    prefix = f"ragtune:test:{os.urandom(6).hex()}:"
    limits = QuotaLimits(requests_per_s=0.05, generated_tokens_per_min=60, concurrent_streams=1)
    acme = Principal("acme", frozenset({Scope.READ}), "key-a")

    async def scenario():
        one = QuotaAdmission(limits.over(QuotaLimits()), None, burst_s=1.0, counters=RedisCounters(REDIS_URL, prefix))
        two = QuotaAdmission(limits.over(QuotaLimits()), None, burst_s=1.0, counters=RedisCounters(REDIS_URL, prefix))
        try:
            release = await one.admit(acme, STREAM_CALL)
            with pytest.raises(QuotaExceeded) as caught:  # the bucket of 1 is spent on the other replica
                await two.admit(acme, READ_CALL)
            assert "requests_per_s" in _refusal(caught)[1] and 19 < _refusal(caught)[2] <= 20
            two.defaults = QuotaLimits(generated_tokens_per_min=60, concurrent_streams=1)  # no request rate
            with pytest.raises(QuotaExceeded) as caught:  # the stream open on the first replica counts here
                await two.admit(acme, STREAM_CALL)
            assert "concurrent_streams" in _refusal(caught)[1]
            release()
            await one.counters.flush()
            (await two.admit(acme, STREAM_CALL))()
            two.charge_tokens("acme", "key-a", 120)
            await two.counters.flush()
            one.defaults = two.defaults
            with pytest.raises(QuotaExceeded) as caught:
                await one.admit(acme, GENERATING_CALL)
            assert "generated_tokens_per_min" in _refusal(caught)[1] and _refusal(caught)[2] > 59
        finally:
            await one.counters._redis.delete(*[k async for k in one.counters._redis.scan_iter(prefix + "*")] or
                                             [prefix + "none"])
            await one.stop()
            await two.stop()

    asyncio.run(scenario())


# --- fair turns at the generator ------------------------------------------------------------------------------

def test_a_flooding_tenant_waits_behind_itself_not_ahead_of_another():
    gate = FairGate(slots=2, per_tenant=0)
    order: list[str] = []

    async def call(tenant: str, n: int, done: asyncio.Event):
        async with gate.slot(tenant, 30):
            order.append(f"{tenant}{n}")
            await done.wait()

    async def scenario():
        finish = {name: asyncio.Event() for name in ("a0", "a1", "a2", "a3", "a4", "b0")}
        tasks = [asyncio.create_task(call("a", n, finish[f"a{n}"])) for n in range(5)]
        await asyncio.sleep(0)  # a0, a1 run; a2..a4 wait
        tasks.append(asyncio.create_task(call("b", 0, finish["b0"])))
        await asyncio.sleep(0)
        assert order == ["a0", "a1"] and gate.waiting("a") == 3 and gate.waiting("b") == 1
        finish["a0"].set()
        while len(order) < 3:
            await asyncio.sleep(0)
        assert order[2] == "b0"  # the first freed slot goes to the tenant that has waited least turns
        for event in finish.values():
            event.set()
        await asyncio.gather(*tasks)
        assert gate.total == 0 and not gate.running

    asyncio.run(scenario())


def test_a_tenant_cap_leaves_slots_to_others_and_a_deadline_ends_the_wait():
    gate = FairGate(slots=3, per_tenant=1)

    async def scenario():
        await gate.acquire("a", 1)
        waiting = asyncio.create_task(gate.acquire("a", 0.05))
        await asyncio.sleep(0)
        await gate.acquire("b", 1)  # a slot is free and b is under its cap: no wait behind a
        assert gate.running == {"a": 1, "b": 1}
        from ragtune.errors import DeadlineExceeded

        with pytest.raises(DeadlineExceeded):
            await waiting
        assert gate.waiting() == 0 and gate.total == 2
        gate.release("a")
        gate.release("b")
        assert gate.total == 0

    asyncio.run(scenario())


# --- the prefix cache, salted per tenant ---------------------------------------------------------------------

def test_each_tenants_prompts_carry_its_own_prefix_cache_salt():
    from services.generator.vllm_params import engine_prompt, tenant_cache_salt

    ids = [1, 2, 3]
    acme, rival = engine_prompt(ids, tenant_cache_salt("acme")), engine_prompt(ids, tenant_cache_salt("rival"))
    assert acme["prompt_token_ids"] == rival["prompt_token_ids"] == ids
    assert acme["cache_salt"] == tenant_cache_salt("acme") != rival["cache_salt"]
    # vLLM keys the first block's hash on the salt: equal prompts of two tenants share no cached block.
    from vllm.v1.core.kv_cache_utils import generate_block_hash_extra_keys

    class Request:
        lora_request = None
        mm_features = ()
        prompt_embeds = None

        def __init__(self, salt):
            self.cache_salt = salt

    first = [generate_block_hash_extra_keys(Request(p["cache_salt"]), 0, 16, 0)[0] for p in (acme, rival)]
    assert first[0] != first[1] and ("cache_salt", "tenant:acme") in first[0]


# --- through the real gateway: gRPC and HTTP --------------------------------------------------------------------

class Tenant:
    def __init__(self, name: str):
        self.name = name
        self.admin, admin_entry = new_key_entry(name, ["admin"])
        self.reader, reader_entry = new_key_entry(name, ["read", "train"])
        self.entries = [admin_entry, reader_entry]
        self.admin_id = "key-" + admin_entry["sha256"][:16]
        self.reader_id = "key-" + reader_entry["sha256"][:16]


TENANTS = {name: Tenant(name) for name in ("acme", "rival", "jobs", "evals", "data")}


@pytest.fixture(scope="module")
def gateway(postgres_server):
    from gateway.server import GatewayService
    from gateway.settings import GatewaySettings
    from tests.database_support import fresh_database
    from tests.grpc_support import InProcessServer, free_port

    dead = f"127.0.0.1:{free_port()}"
    keys = json.dumps({"keys": [e for t in TENANTS.values() for e in t.entries]})
    with fresh_database(postgres_server) as url:
        settings = GatewaySettings(port=0, http_port=0, api_keys=keys, retriever_address=dead, generator_address=dead,
                                   trainer_address=dead, retry_attempts=1, evaluation_workers=0, RAGTUNE_DATABASE_URL=url,
                                   quota_burst_s=1.0)
        with InProcessServer(GatewayService, settings, "gateway") as server:
            channel = grpc.insecure_channel(server.address)
            server.stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            server.db = Database(url)
            yield server
            channel.close()
            server.db.dispose()


def _as(key: str):
    return (("authorization", f"Bearer {key}"),)


def _stored(gateway, tenant: Tenant) -> list[tuple[str, QuotaLimits]]:
    return [(r.key_id, r.limits) for r in QuotaStore(gateway.db).list(tenant.name)]


def test_an_over_limit_call_is_resource_exhausted_with_quota_failure_and_retry_info(gateway):
    acme, rival = TENANTS["acme"], TENANTS["rival"]
    stub = gateway.stub
    set_ = stub.SetQuota(gateway_pb2.SetQuotaRequest(key_id=acme.reader_id, limits=gateway_pb2.QuotaLimits(
        requests_per_s=0.1)), metadata=_as(acme.admin), timeout=10)
    assert set_.quota.key_id == acme.reader_id and set_.quota.limits.requests_per_s == pytest.approx(0.1)
    assert set_.quota.effective.concurrent_streams == 256  # the rest: the tenant's, here the defaults
    stub.ListEvaluations(gateway_pb2.ListEvaluationsRequest(), metadata=_as(acme.reader), timeout=10)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ListEvaluations(gateway_pb2.ListEvaluationsRequest(), metadata=_as(acme.reader), timeout=10)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    (violation,) = quota_violations(caught.value)
    assert violation.subject == f"key:{acme.reader_id}" and "requests_per_s: limit 0.1" in violation.description
    assert 5 < retry_delay_s(caught.value) <= 10
    # The tenant's other key and another tenant are unaffected.
    stub.ListEvaluations(gateway_pb2.ListEvaluationsRequest(), metadata=_as(acme.admin), timeout=10)
    stub.ListEvaluations(gateway_pb2.ListEvaluationsRequest(), metadata=_as(rival.reader), timeout=10)

    # The HTTP front: 429 with Retry-After and OpenAI's error body, before the route does anything.
    url = f"http://127.0.0.1:{gateway.service.http_port}/v1"
    refused = httpx.get(f"{url}/models", headers={"authorization": f"Bearer {acme.reader}"}, timeout=30)
    assert refused.status_code == 429, refused.text
    assert 5 <= int(refused.headers["retry-after"]) <= 10
    assert refused.json()["error"]["type"] == "rate_limit_error" and "requests_per_s" in refused.json()["error"]["message"]


def test_a_key_without_admin_cannot_set_quotas_and_nothing_changes(gateway):
    rival = TENANTS["rival"]
    before = _stored(gateway, rival)
    for request in (gateway_pb2.SetQuotaRequest(limits=gateway_pb2.QuotaLimits(requests_per_s=1e6)),
                    gateway_pb2.SetQuotaRequest(key_id=rival.reader_id,
                                                limits=gateway_pb2.QuotaLimits(concurrent_streams=10**6))):
        with pytest.raises(grpc.RpcError) as caught:
            gateway.stub.SetQuota(request, metadata=_as(rival.reader), timeout=10)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as caught:
        gateway.stub.ListQuotas(gateway_pb2.ListQuotasRequest(), metadata=_as(rival.reader), timeout=10)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert _stored(gateway, rival) == before


def test_a_tenant_admin_cannot_raise_its_own_tenant_above_the_operators_limits(gateway):
    rival = TENANTS["rival"]
    before = _stored(gateway, rival)
    for request in (gateway_pb2.SetQuotaRequest(limits=gateway_pb2.QuotaLimits(requests_per_s=1e6)),
                    gateway_pb2.SetQuotaRequest(limits=gateway_pb2.QuotaLimits(concurrent_streams=257))):
        with pytest.raises(grpc.RpcError) as caught:
            gateway.stub.SetQuota(request, metadata=_as(rival.admin), timeout=10)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "above the operator's limit" in caught.value.details()
    assert _stored(gateway, rival) == before


def test_an_admin_of_one_tenant_cannot_touch_another_tenants_quotas(gateway):
    acme, rival = TENANTS["acme"], TENANTS["rival"]
    gateway.stub.SetQuota(gateway_pb2.SetQuotaRequest(limits=gateway_pb2.QuotaLimits(queued_jobs=7)),
                          metadata=_as(rival.admin), timeout=10)
    before = _stored(gateway, rival)
    with pytest.raises(grpc.RpcError) as caught:  # rival's key named by acme's admin: not there for it
        gateway.stub.SetQuota(gateway_pb2.SetQuotaRequest(key_id=rival.reader_id, limits=gateway_pb2.QuotaLimits(
            requests_per_s=0.0)), metadata=_as(acme.admin), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "key_id" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        gateway.stub.GetQuota(gateway_pb2.GetQuotaRequest(key_id=rival.reader_id), metadata=_as(acme.admin),
                              timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    listed = gateway.stub.ListQuotas(gateway_pb2.ListQuotasRequest(), metadata=_as(acme.admin), timeout=10).quotas
    assert {q.tenant for q in listed} == {"acme"}
    assert _stored(gateway, rival) == before
    rival_own = gateway.stub.GetQuota(gateway_pb2.GetQuotaRequest(), metadata=_as(rival.admin), timeout=10).quota
    assert rival_own.limits.queued_jobs == 7 and rival_own.effective.queued_jobs == 7
    with pytest.raises(grpc.RpcError) as caught:
        gateway.stub.SetQuota(gateway_pb2.SetQuotaRequest(limits=gateway_pb2.QuotaLimits(concurrent_streams=-1)),
                              metadata=_as(rival.admin), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "limits.concurrent_streams" in \
        caught.value.details()
    assert _stored(gateway, rival) == before


def test_jobs_evaluations_and_uploads_beyond_the_tenants_quota_are_refused_before_anything_is_made(gateway):
    jobs_tenant, evals_tenant, data_tenant = TENANTS["jobs"], TENANTS["evals"], TENANTS["data"]
    stub = gateway.stub
    for tenant, limits in ((jobs_tenant, gateway_pb2.QuotaLimits(queued_jobs=1)),
                           (evals_tenant, gateway_pb2.QuotaLimits(running_evaluations=1)),
                           (data_tenant, gateway_pb2.QuotaLimits(stored_bytes=1000))):
        stub.SetQuota(gateway_pb2.SetQuotaRequest(limits=limits), metadata=_as(tenant.admin), timeout=10)
    job_store, evaluation_store = JobStore(gateway.db), EvaluationStore(gateway.db)
    job_store.create("jobs", {"adapter_name": "first"})
    evaluation_store.create("evals", b"spec", {}, lambda t, i: f"evaluations/{t}/{i}")
    with gateway.db.transaction() as c:
        c.execute(datasets.insert().values(tenant="data", name="big", path="p", size_bytes=1000, sha256="0" * 64,
                                           lines=1, update_time=0.0))

    def refused(call) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
        assert retry_delay_s(caught.value) > 0
        return caught.value

    error = refused(lambda: stub.CreateJob(gateway_pb2.GatewayServiceCreateJobRequest(),
                                           metadata=_as(jobs_tenant.reader), timeout=10))
    assert quota_violations(error)[0].subject == "tenant:jobs" and "queued_jobs: limit 1" in \
        quota_violations(error)[0].description
    assert len(job_store.list("jobs")) == 1
    error = refused(lambda: stub.CreateEvaluation(gateway_pb2.CreateEvaluationRequest(),
                                                  metadata=_as(evals_tenant.reader), timeout=10))
    assert "running_evaluations: limit 1" in quota_violations(error)[0].description
    assert len(evaluation_store.list("evals")) == 1
    error = refused(lambda: stub.UploadDataset(iter([gateway_pb2.GatewayServiceUploadDatasetRequest()]),
                                               metadata=_as(data_tenant.reader), timeout=10))
    assert "stored_bytes: limit 1000" in quota_violations(error)[0].description
    # Under its quota a tenant's call goes on to the trainer (down here: UNAVAILABLE, not a quota).
    with pytest.raises(grpc.RpcError) as caught:
        stub.CreateJob(gateway_pb2.GatewayServiceCreateJobRequest(), metadata=_as(TENANTS["rival"].reader),
                       timeout=10)
    assert caught.value.code() != grpc.StatusCode.RESOURCE_EXHAUSTED


def test_the_cli_sets_shows_and_lists_the_tenants_quotas(gateway, capsys):
    from clients.cli.main import main

    acme = TENANTS["acme"]
    base = ["--gateway", gateway.address, "--api-key", acme.admin, "quotas"]
    assert main([*base, "set", "--concurrent-streams", "5", "--stored-bytes", "4096"]) == 0
    assert main([*base, "set", "--queued-jobs", "2", "--clear", "stored_bytes"]) == 0  # merged into what is stored
    assert QuotaStore(gateway.db).get("acme").limits == QuotaLimits(concurrent_streams=5, queued_jobs=2)
    assert main([*base, "show"]) == 0
    shown = capsys.readouterr().out
    assert "concurrent_streams" in shown and "5" in shown and "default" in shown
    assert main([*base, "set", "--key-id", acme.reader_id, "--requests-per-s", "0.1"]) == 0
    assert QuotaStore(gateway.db).get("acme", acme.reader_id).limits == QuotaLimits(requests_per_s=0.1)
    capsys.readouterr()
    assert main([*base, "list"]) == 0
    listed = capsys.readouterr().out
    assert listed.index("tenant acme") < listed.index(f"key {acme.reader_id}")
    assert main(["--gateway", gateway.address, "--api-key", acme.reader, "quotas", "set", "--queued-jobs", "99"]) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    assert QuotaStore(gateway.db).get("acme").limits == QuotaLimits(concurrent_streams=5, queued_jobs=2)
    assert main([*base, "set", "--replace"]) == 0  # nothing given: back to the defaults
    assert QuotaStore(gateway.db).get("acme").limits.empty
