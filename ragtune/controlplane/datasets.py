"""`DatasetRecords`: which datasets each tenant has uploaded (the bytes live under the artifact root)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import exc, insert, select, update

from ragtune.controlplane.database import Database
from ragtune.controlplane.schema import datasets


@dataclass(frozen=True)
class DatasetRecord:
    tenant: str
    name: str
    path: str  # relative to the artifact root
    size_bytes: int
    sha256: str
    lines: int
    update_time: float


class DatasetRecords:
    def __init__(self, database: Database):
        self.db = database

    def put(self, tenant: str, name: str, path: str, size_bytes: int, sha256: str, lines: int) -> DatasetRecord:
        """Records (or replaces) a dataset; the file at `path` must already be complete."""
        values = dict(path=path, size_bytes=size_bytes, sha256=sha256, lines=lines, update_time=time.time())
        key = (datasets.c.tenant == tenant, datasets.c.name == name)
        for _ in range(3):  # two replicas recording the same new name at once: the loser updates
            try:
                with self.db.transaction() as c:
                    if c.execute(update(datasets).where(*key).values(**values)).rowcount == 0:
                        c.execute(insert(datasets).values(tenant=tenant, name=name, **values))
                break
            except exc.IntegrityError:
                continue
        return DatasetRecord(tenant, name, **values)

    def get(self, tenant: str, name: str) -> DatasetRecord | None:
        with self.db.read() as c:
            row = c.execute(select(datasets).where(datasets.c.tenant == tenant, datasets.c.name == name)).mappings().first()
        return DatasetRecord(**row) if row else None

    def list(self, tenant: str) -> list[DatasetRecord]:
        with self.db.read() as c:
            rows = c.execute(select(datasets).where(datasets.c.tenant == tenant).order_by(datasets.c.name)).mappings().all()
        return [DatasetRecord(**r) for r in rows]
