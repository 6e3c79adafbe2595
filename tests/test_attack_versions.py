"""Attacks on what a version or an alias names (issue #27, item 5), against the real control plane
(SQLite and PostgreSQL) and a real registry folder:

- deleting the newest adapter version and training again must not publish the same number with
  other weights; two publishers on two replicas at once never share a number; an existing registry
  starts the counter above its versions;
- a generator that loaded a version keeps no stale weights once that folder holds other files;
- a database outage leaves every alias this replica has read serving its last known target, and an
  alias it never read answers UNAVAILABLE naming it (a real PostgreSQL stopped under the resolver).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from pathlib import Path

import grpc
import pytest

from ragtune.controlplane import Database
from ragtune.controlplane.adapter_versions import AdapterVersionCounter
from ragtune.controlplane.aliases import AliasStore, Target
from ragtune.errors import NotFound, ServiceError
from ragtune.models import BASE_MODEL_NAME
from ragtune.registry import CONTENT_DIGEST, METADATA_FILE, AdapterRegistry
from services.generator.adapters import CONFIG_FILE, WEIGHTS_FILE, AdapterCatalog
from services.generator.aliases import AliasResolver
from tests.database_support import LocalPostgres
from tests.grpc_support import free_port

TENANT = "acme"
META = {"base_model": BASE_MODEL_NAME, "method": "lora", "servable": True}


def adapter_folder(root: Path, weights: bytes) -> Path:
    """A LoRA adapter's files as PEFT writes them (the registry and the catalog read no more)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}))
    (root / WEIGHTS_FILE).write_bytes(weights)
    return root


# --- version numbers ---------------------------------------------------------------------------


def test_a_deleted_version_number_is_never_published_again(database, tmp_path):
    registry = AdapterRegistry(tmp_path / "adapters")
    counter = AdapterVersionCounter(database)
    first = registry.publish(TENANT, "style", adapter_folder(tmp_path / "a", b"weights one"), META, counter=counter)
    second = registry.publish(TENANT, "style", adapter_folder(tmp_path / "b", b"weights two"), META, counter=counter)
    assert (first.version, second.version) == (1, 2)
    served_as_two = second.metadata[CONTENT_DIGEST]

    registry.delete(TENANT, "style", 2)  # the hostile sequence: drop the newest, train again
    third = registry.publish(TENANT, "style", adapter_folder(tmp_path / "c", b"other weights"), META, counter=counter)
    assert third.version == 3 and registry.versions(TENANT, "style") == [1, 3]
    with pytest.raises(NotFound):
        registry.get(TENANT, "style/2")  # 2 stays gone: nobody can be served other weights as "style/2"
    assert third.metadata[CONTENT_DIGEST] != served_as_two

    registry.delete(TENANT, "style")  # every version, then the same name again
    again = registry.publish(TENANT, "style", adapter_folder(tmp_path / "d", b"new start"), META, counter=counter)
    assert again.version == 4 and counter.last(TENANT, "style") == 4
    # Each tenant and name counts on its own.
    assert registry.publish("rival", "style", tmp_path / "d", META, counter=counter).version == 1
    assert registry.publish(TENANT, "other", tmp_path / "d", META, counter=counter).version == 1


def test_the_counter_starts_above_an_existing_registry_and_the_registry_above_the_counter(database, tmp_path):
    """A registry filled before the counter existed (versions 1-3, the newest deleted) and a counter
    ahead of the folder (a replica whose storage lagged): each new number is above both."""
    registry = AdapterRegistry(tmp_path / "adapters")
    for weights in (b"1", b"2", b"3"):
        registry.publish(TENANT, "legacy", adapter_folder(tmp_path / weights.decode(), weights), META)
    registry.delete(TENANT, "legacy", 3)
    counter = AdapterVersionCounter(database)
    assert registry.publish(TENANT, "legacy", tmp_path / "1", META, counter=counter).version == 4

    assert counter.next(TENANT, "ahead") == 1 and counter.next(TENANT, "ahead") == 2  # numbers used elsewhere
    assert registry.publish(TENANT, "ahead", tmp_path / "1", META, counter=counter).version == 3


def test_concurrent_publishers_on_two_replicas_never_share_a_version(database_url, tmp_path):
    """Two replicas (each its own engine on the same database), several threads each, all asking for
    the first numbers of a new adapter at the same moment: every number once, none skipped."""
    replicas = [Database(database_url), Database(database_url)]
    for replica in replicas:
        replica.migrate()
    counters = [AdapterVersionCounter(r) for r in replicas]
    threads_per_replica, each = 4, 10
    start = threading.Barrier(threads_per_replica * len(counters))
    handed: list[int] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def publish_numbers(counter: AdapterVersionCounter) -> None:
        try:
            start.wait(timeout=30)
            mine = [counter.next(TENANT, "raced") for _ in range(each)]
            with lock:
                handed.extend(mine)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=publish_numbers, args=(c,)) for c in counters
               for _ in range(threads_per_replica)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    try:
        assert not errors, errors
        total = threads_per_replica * len(counters) * each
        assert sorted(handed) == list(range(1, total + 1))

        # The same through the registry: two replicas' registries on one shared folder.
        registries = [AdapterRegistry(tmp_path / "adapters"), AdapterRegistry(tmp_path / "adapters")]
        source = adapter_folder(tmp_path / "src", b"w")
        published: list[int] = []

        def publish(registry: AdapterRegistry, counter: AdapterVersionCounter) -> None:
            for _ in range(3):
                version = registry.publish(TENANT, "shared", source, META, counter=counter).version
                with lock:
                    published.append(version)

        workers = [threading.Thread(target=publish, args=(r, c)) for r, c in zip(registries, counters)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(timeout=120)
        assert sorted(published) == [1, 2, 3, 4, 5, 6]
        assert registries[0].versions(TENANT, "shared") == [1, 2, 3, 4, 5, 6]
    finally:
        for replica in replicas:
            replica.dispose()


# --- the generator never serves weights a folder no longer holds ---------------------------------


class RecordingEngine:
    """Records what the catalog asks of the engine (the decision under test is the catalog's)."""

    max_model_len = 2048

    def __init__(self):
        self.loaded: dict[int, bytes] = {}  # LoRA id -> the weights read when it was added
        self.removed: list[int] = []

    async def add_lora(self, handle) -> None:
        assert handle.lora_id not in self.loaded, "an id still in the engine was given to other weights"
        self.loaded[handle.lora_id] = (handle.path / WEIGHTS_FILE).read_bytes()

    async def remove_lora(self, lora_id: int) -> None:
        self.removed.append(lora_id)
        del self.loaded[lora_id]


def test_a_generator_reloads_a_version_whose_folder_now_holds_other_weights(tmp_path):
    registry = AdapterRegistry(tmp_path / "adapters")
    published = registry.publish(TENANT, "style", adapter_folder(tmp_path / "a", b"weights A"), META)
    engine = RecordingEngine()
    catalog = AdapterCatalog(registry, engine, base_model=BASE_MODEL_NAME, max_lora_rank=16)

    def swap_in(weights: bytes) -> None:
        """Another adapter's files land in the same version folder (a restore, a hand copy) with the
        metadata the registry would write for them."""
        (published.path / WEIGHTS_FILE).write_bytes(weights)
        meta = json.loads((published.path / METADATA_FILE).read_text())
        meta[CONTENT_DIGEST] = f"digest of {weights!r}"
        (published.path / METADATA_FILE).write_text(json.dumps(meta))

    async def scenario() -> None:
        first = await catalog.acquire(TENANT, "style/1")
        await catalog.release(first)
        assert (await catalog.acquire(TENANT, "style/1")) is first  # unchanged: the loaded copy is used
        swap_in(b"weights B")
        second = await catalog.acquire(TENANT, "style/1")  # `first` still has a user: it stays for it
        assert second.handle.lora_id != first.handle.lora_id and engine.loaded[second.handle.lora_id] == b"weights B"
        assert first.handle.lora_id in engine.loaded
        await catalog.release(first)
        assert first.handle.lora_id not in engine.loaded and engine.removed == [first.handle.lora_id]
        await catalog.release(second)

        swap_in(b"weights A")  # the first files back: a new id, never one another entry still holds
        third = await catalog.acquire(TENANT, "style/1")
        assert engine.loaded[third.handle.lora_id] == b"weights A" and second.handle.lora_id not in engine.loaded
        assert [e.handle.lora_id for e in catalog.loaded(TENANT)] == [third.handle.lora_id]
        await catalog.release(third)

    asyncio.run(scenario())


# --- aliases through a database outage -----------------------------------------------------------


@pytest.fixture
def stoppable_postgres():
    """A PostgreSQL of its own (initdb in a temporary folder), so the test can stop it under the resolver."""
    server = LocalPostgres(free_port())
    server.start()
    try:
        yield server
    finally:
        server.destroy()


def test_an_alias_keeps_its_last_known_target_through_a_database_outage(stoppable_postgres, caplog):
    database = Database(stoppable_postgres.url)
    database.migrate()
    store = AliasStore(database)
    store.set(TENANT, "style", "prod", [Target(3, 100)], actor="test")
    store.set(TENANT, "style", "canary", [Target(3, 50), Target(4, 50)], actor="test")
    resolver = AliasResolver(store, refresh_s=0.0)  # every call reads: each one meets the outage

    async def resolve(alias: str, name: str = "style") -> str:
        return await resolver.resolve(TENANT, name, alias)

    try:
        assert asyncio.run(resolve("prod")) == "style/3"
        assert asyncio.run(resolve("canary")) in ("style/3", "style/4")
        with pytest.raises(NotFound):  # a read that finds nothing is an answer, not an outage
            asyncio.run(resolve("nightly"))

        stoppable_postgres.stop()  # the hostile condition: the control plane is gone
        caplog.set_level(logging.WARNING, logger="services.generator.aliases")
        served = {asyncio.run(resolve("prod")) for _ in range(5)}
        assert served == {"style/3"}
        assert {asyncio.run(resolve("canary")) for _ in range(20)} <= {"style/3", "style/4"}
        warning = next(r.getMessage() for r in caplog.records if "last known target" in r.getMessage())
        assert "style@prod" in warning and "s ago" in warning

        for never_read in ("nightly", "staging"):
            with pytest.raises(ServiceError) as err:
                asyncio.run(resolve(never_read))
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
            assert f"style@{never_read}" in err.value.message

        stoppable_postgres.start()  # back: a move made now is served within the refresh bound again
        store.set(TENANT, "style", "prod", [Target(5, 100)], actor="test")
        assert asyncio.run(resolve("prod")) == "style/5"
        store.delete(TENANT, "style", "prod", actor="test")
        with pytest.raises(NotFound):  # deleted: the last known target is not served any more
            asyncio.run(resolve("prod"))
    finally:
        database.dispose()
