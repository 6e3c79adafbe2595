"""The control plane's API-key and evaluation records, on SQLite and on a real PostgreSQL: keys made,
listed, revoked and imported once; evaluations claimed by one worker at a time, results saved
once, and a worker that lost its lease fenced out."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from ragtune.controlplane import evaluations as states
from ragtune.controlplane.api_keys import ApiKeyStore, hash_key, new_key_entry, parse_key_entries
from ragtune.controlplane.database import Database, parse_url
from ragtune.controlplane.evaluations import EvaluationStore, LeaseLost
from ragtune.errors import NotFound
from tests.grpc_support import REPO_ROOT


def test_keys_are_shown_once_listed_without_the_key_and_revoked(database):
    store = ApiKeyStore(database)
    key, record = store.create("acme", ["read", "read", "ingest"], name="ci")
    assert key.startswith("rt_") and record.prefix == key[:8] and record.scopes == ("ingest", "read")
    listed = store.list("acme")
    assert [k.id for k in listed] == [record.id]
    assert key not in repr(listed) and hash_key(key) not in repr(listed)
    assert {k.sha256 for k in store.active()} == {hash_key(key)}
    assert store.list("rival") == []
    with pytest.raises(NotFound):
        store.revoke("rival", record.id)  # another tenant's key is not there for it
    revoked = store.revoke("acme", record.id)
    assert revoked.revoked and store.revoke("acme", record.id).revoke_time == revoked.revoke_time  # idempotent
    assert store.active() == [] and store.list("acme") == []
    assert [k.id for k in store.list("acme", include_revoked=True)] == [record.id]


def test_the_keys_file_is_imported_once_and_a_revoked_import_stays_revoked(database):
    store = ApiKeyStore(database)
    _, entry = new_key_entry("acme", ["admin"])
    entries = parse_key_entries('{"keys": [%s]}' % __import__("json").dumps(entry))
    assert store.import_entries(entries).added == 1
    assert store.import_entries(entries).added == 0  # a second replica starting imports nothing new
    (imported,) = store.list("acme")
    assert imported.source == "file"
    store.revoke("acme", imported.id)
    assert store.import_entries(entries).added == 0 and store.active() == []


def _new_evaluation(store: EvaluationStore, tenant: str = "acme"):
    return store.create(tenant, b"spec-bytes", {"questions": 2, "answers_total": 2},
                        lambda t, i: f"evaluations/{t}/{i}")


def test_evaluations_are_claimed_by_one_worker_and_results_saved_once(database):
    store = EvaluationStore(database)
    created = _new_evaluation(store)
    assert created.state == states.QUEUED and created.report_path == f"evaluations/acme/{created.id}"
    assert store.get(created.id, "acme").spec == b"spec-bytes"
    with pytest.raises(NotFound):
        store.get(created.id, "rival")
    claims: list = []
    barrier = threading.Barrier(4)

    def claim(n: int) -> None:
        barrier.wait()
        claims.append(store.claim(f"w{n}", lease_s=30))

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [c for c in claims if c is not None]
    assert len(won) == 1 and won[0].state == states.RUNNING and won[0].attempts == 1
    worker = won[0].worker_id
    before = store.revision(created.id)
    store.save_result(created.id, worker, "base", 0, {"answer": "a"}, {"answers_done": 1})
    store.save_result(created.id, worker, "base", 0, {"answer": "again"}, {"answers_done": 1})
    assert store.results(created.id) == {("base", 0): {"answer": "a"}}
    assert store.revision(created.id) > before  # watchers see each save
    assert store.finish(created.id, states.SUCCEEDED, {"answers_done": 2}, worker=worker)
    done = store.get(created.id)
    assert done.state == states.SUCCEEDED and done.snapshot["answers_done"] == 2 and done.worker_id == ""
    assert not store.finish(created.id, states.FAILED, {}, "late")  # a final state is final
    kinds = [e["kind"] for e in store.events(created.id)]
    assert kinds == ["state_changed", "claimed", "state_changed"]


def test_an_expired_lease_moves_the_evaluation_and_fences_out_the_old_worker(database):
    store = EvaluationStore(database)
    created = _new_evaluation(store)
    assert store.claim("old", lease_s=0.2).id == created.id
    store.save_result(created.id, "old", "base", 0, {"answer": "kept"}, {"answers_done": 1})
    assert store.claim("new", lease_s=30) is None  # still leased
    time.sleep(0.3)
    taken = store.claim("new", lease_s=30)
    assert taken.id == created.id and taken.attempts == 2
    assert not store.renew(created.id, "old", 30).held
    with pytest.raises(LeaseLost):
        store.save_result(created.id, "old", "base", 1, {"answer": "stale"}, {"answers_done": 2})
    with pytest.raises(LeaseLost):
        store.update_snapshot(created.id, "old", {})
    assert not store.finish(created.id, states.SUCCEEDED, {}, worker="old")
    assert store.results(created.id) == {("base", 0): {"answer": "kept"}}  # resumed from here
    store.request_cancel(created.id)
    assert store.renew(created.id, "new", 30).cancel_requested
    store.release(created.id, "new")
    assert store.claim("third", lease_s=30).id == created.id  # released: no wait for the lease


def test_a_queued_evaluation_is_cancelled_at_once(database):
    store = EvaluationStore(database)
    created = _new_evaluation(store)
    assert store.finish(created.id, states.CANCELLED, created.snapshot, only_from=(states.QUEUED,))
    assert store.claim("w", lease_s=30) is None


def test_bad_database_urls_name_the_variable():
    for url in ("not a url", "mysql://u@h/db", "sqlite://", "postgresql://u@h"):
        with pytest.raises(ValueError, match="RAGTUNE_DATABASE_URL"):
            parse_url(url)
    assert parse_url("postgresql://u@h:5432/db", password="s3cret").drivername == "postgresql+psycopg"


def test_a_database_that_does_not_answer_fails_start_naming_the_variable(tmp_path):
    from tests.grpc_support import free_port

    database = Database(f"postgresql://nobody@127.0.0.1:{free_port()}/none", password="hunter2")
    started = time.monotonic()
    with pytest.raises(Exception) as err:
        database.migrate(wait_s=1.0)
    assert "RAGTUNE_DATABASE_URL" in str(err.value) and "hunter2" not in str(err.value)
    assert time.monotonic() - started < 15


def _head_revision() -> str:
    """The newest migration's revision, read from the migration scripts (each new one moves it)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from ragtune.controlplane.database import MIGRATIONS

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(config).get_current_head()


def test_migrations_from_many_processes_at_once_run_once(database_url):
    """Replicas starting together all run `migrate`; the lock makes them queue, and all end at head."""
    env_url = database_url
    procs = [
        subprocess.Popen([sys.executable, "-m", "ragtune.controlplane", "migrate", "--wait", "30"], cwd=REPO_ROOT,
                         env={**__import__("os").environ, "RAGTUNE_DATABASE_URL": env_url},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    head = _head_revision()
    assert all(f"schema at revision {head}" in out for out in outputs), outputs
    database = Database(database_url)
    assert database.migrate() == head
    database.dispose()


def test_the_migrations_build_exactly_the_schema_the_stores_use(database):
    """A model change without a migration (or the reverse) fails here, on both backends."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from ragtune.controlplane.schema import metadata

    with database.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), metadata) == []


def test_reads_do_not_wait_behind_a_writer(database):
    """On SQLite reads take no write lock (WAL snapshot); PostgreSQL never blocks readers."""
    from sqlalchemy import text

    store = ApiKeyStore(database)
    store.create("acme", ["read"])
    with database.transaction() as writer:
        writer.execute(text("UPDATE api_keys SET name = 'busy'"))
        started = time.monotonic()
        assert len(store.active()) == 1
        assert time.monotonic() - started < 1.0


def test_aliases_move_atomically_are_audited_and_roll_back(database):
    from collections import Counter
    import random

    from ragtune.controlplane.aliases import AliasStore, Target
    from ragtune.errors import FailedPrecondition, InvalidArgument

    store = AliasStore(database)
    with pytest.raises(NotFound):
        store.get("acme", "style", "prod")
    first = store.set("acme", "style", "prod", [Target(1, 0)], actor="key-a", reason="first release")
    assert first.targets == (Target(1, 100),) and first.revision == 1
    with pytest.raises(FailedPrecondition):
        store.rollback("acme", "style", "prod", actor="key-a")  # nothing before the first target
    moved = store.set("acme", "style", "prod", [Target(2, 90), Target(3, 10)], actor="key-b", reason="canary")
    assert moved.revision == 2
    rng = random.Random(7)
    picks = Counter(moved.pick(rng) for _ in range(1000))
    assert set(picks) == {2, 3} and 40 <= picks[3] <= 160  # about 10% to the canary
    back = store.rollback("acme", "style", "prod", actor="key-c", reason="canary errors")
    assert back.targets == (Target(1, 100),) and back.revision == 3
    history = store.history("acme", "style", "prod")
    assert [(e.action, e.actor) for e in history] == [("set", "key-a"), ("set", "key-b"), ("rollback", "key-c")]
    assert history[-1].from_targets == (Target(2, 90), Target(3, 10)) and history[-1].reason == "canary errors"
    assert store.list("rival") == [] and [a.alias for a in store.list("acme")] == ["prod"]
    with pytest.raises(NotFound):
        store.get("rival", "style", "prod")  # another tenant's alias does not exist for it
    for bad in ([], [Target(1, 50), Target(1, 50)], [Target(0, 100)], [Target(1, 0), Target(2, 100)],
                [Target(1, 1), Target(2, 1), Target(3, 1)]):
        with pytest.raises(InvalidArgument):
            store.set("acme", "style", "prod", bad, actor="x")
    with pytest.raises(InvalidArgument):
        store.set("acme", "style", "Prod!", [Target(1, 100)], actor="x")
    assert store.get("acme", "style", "prod").revision == 3  # refused moves changed nothing
