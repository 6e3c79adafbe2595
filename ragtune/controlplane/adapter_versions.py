"""`AdapterVersionCounter`: hands out adapter version numbers from the control plane, one above the
last ever handed out for that (tenant, adapter), so a number is never published twice even after
its version is deleted, and two trainers publishing at once on different replicas never collide."""

from __future__ import annotations

import time

from sqlalchemy import case, select
from sqlalchemy.dialects import postgresql, sqlite

from ragtune.controlplane.database import Database
from ragtune.controlplane.schema import adapter_version_counters as counters


class AdapterVersionCounter:
    """Thread-safe; any number of replicas may share the database."""

    def __init__(self, database: Database):
        self.db = database

    def next(self, tenant: str, adapter: str, at_least: int = 0) -> int:
        """A new version number above both the last one handed out and `at_least` (the newest version
        the registry already holds: a registry older than this counter starts it there)."""
        dialect = sqlite if self.db.is_sqlite else postgresql
        now = time.time()
        # One upsert statement: PostgreSQL locks the row for it (a concurrent one waits and then sees
        # this increment); SQLite's BEGIN IMMEDIATE serializes writers. The first publish of an
        # adapter inserts; two first publishes at once both end in the update branch but one.
        statement = dialect.insert(counters).values(
            tenant=tenant, adapter=adapter, last_version=at_least + 1, update_time=now)
        statement = statement.on_conflict_do_update(
            index_elements=[counters.c.tenant, counters.c.adapter],
            set_={
                "last_version": case((counters.c.last_version > at_least, counters.c.last_version),
                                     else_=at_least) + 1,
                "update_time": now,
            },
        ).returning(counters.c.last_version)
        with self.db.transaction() as c:
            return int(c.execute(statement).scalar_one())

    def last(self, tenant: str, adapter: str) -> int:
        """The last version handed out (0 when none has been)."""
        with self.db.read() as c:
            value = c.execute(select(counters.c.last_version).where(
                counters.c.tenant == tenant, counters.c.adapter == adapter)).scalar()
        return int(value or 0)
