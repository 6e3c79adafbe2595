"""Rollouts and rollbacks against one database: migrations only add (expand/contract), so a release's code
starts and serves on a schema a newer release migrated, instead of crash-looping on a revision it cannot
find (an old-image pod during an upgrade, or every pod after `kubectl rollout undo`)."""

from __future__ import annotations

import sqlalchemy as sa

from ragtune.controlplane import Database
from ragtune.controlplane.api_keys import ApiKeyStore
from ragtune.controlplane.evaluations import EvaluationStore


def _next_release_migrates(db: Database) -> None:
    """What a newer release's additive migration does: a new column, a new table, its own revision id."""
    with db.engine.begin() as c:
        c.execute(sa.text("ALTER TABLE api_keys ADD COLUMN expires_at DOUBLE PRECISION"))
        c.execute(sa.text("CREATE TABLE future_things (id VARCHAR(32) PRIMARY KEY)"))
        c.execute(sa.text("UPDATE alembic_version SET version_num = '9001_next_release'"))


def test_this_release_serves_on_the_next_releases_schema(database_url):
    db = Database(database_url)
    try:
        head = db.migrate()
        keys = ApiKeyStore(db)
        key, before = keys.create("acme", ["read"], "before-upgrade")
        _next_release_migrates(db)
        # The rolled-back (or not yet replaced) pod starts: no crash, no downgrade, the newer revision stays.
        assert db.migrate() == "9001_next_release"
        with db.read() as c:
            assert c.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == "9001_next_release"
        # And it serves: reads and writes of its own columns work beside the new ones.
        _, after = keys.create("acme", ["read", "train"], "after-upgrade")
        assert {k.name for k in keys.list("acme")} == {"before-upgrade", "after-upgrade"}
        assert keys.revoke("acme", before.id).revoked
        evaluation = EvaluationStore(db).create("acme", b"spec", {})
        assert EvaluationStore(db).get(evaluation.id, "acme").state == evaluation.state
        assert head != "9001_next_release"
    finally:
        db.dispose()
