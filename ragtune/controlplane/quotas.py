"""`QuotaStore`: each tenant's quota limits, and the overrides of single API keys, as data every gateway
replica reads; plus the tenant's usage that the records already hold (unfinished jobs and evaluations,
stored dataset bytes), counted where the quotas on them are checked."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields, replace

from sqlalchemy import delete, func, insert, select, update

from ragtune.controlplane.database import Database
from ragtune.controlplane.schema import api_keys, datasets, evaluations, jobs, quotas
from ragtune.errors import FieldViolation, InvalidArgument, NotFound

# What a job or an evaluation holds while it counts against its tenant's quota.
_UNFINISHED_JOBS = ("QUEUED", "VALIDATING", "RUNNING")
_UNFINISHED_EVALUATIONS = ("QUEUED", "RUNNING")
_MAX_COUNT = 2**31 - 1
_MAX_BYTES = 2**62


@dataclass(frozen=True)
class QuotaLimits:
    """Limits of a tenant or of one key; None is "not set here" (the default applies)."""

    requests_per_s: float | None = None
    generated_tokens_per_min: int | None = None
    concurrent_streams: int | None = None
    queued_jobs: int | None = None
    running_evaluations: int | None = None
    stored_bytes: int | None = None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def as_dict(self) -> dict[str, float | int | None]:
        return {name: getattr(self, name) for name in self.names()}

    @property
    def empty(self) -> bool:
        return all(value is None for value in self.as_dict().values())

    def over(self, defaults: "QuotaLimits") -> "QuotaLimits":
        """These limits where set, `defaults` elsewhere."""
        return replace(defaults, **{k: v for k, v in self.as_dict().items() if v is not None})

    def validated(self, field: str = "limits") -> "QuotaLimits":
        """INVALID_ARGUMENT naming every limit that is negative, not finite or too large."""
        problems = []
        for name, value in self.as_dict().items():
            if value is None:
                continue
            ceiling = _MAX_BYTES if name in ("stored_bytes", "generated_tokens_per_min") else _MAX_COUNT
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(FieldViolation(f"{field}.{name}", "must be a finite number"))
            elif value < 0:
                problems.append(FieldViolation(f"{field}.{name}", f"must be 0 or more (0 allows nothing), not {value}"))
            elif value > ceiling:
                problems.append(FieldViolation(f"{field}.{name}", f"must be at most {ceiling}"))
        if problems:
            raise InvalidArgument.of(problems)
        return self


@dataclass(frozen=True)
class QuotaRecord:
    tenant: str
    key_id: str  # "" for the tenant's own limits
    limits: QuotaLimits
    update_time: float
    updated_by: str


def _record(row) -> QuotaRecord:
    limits = QuotaLimits(**{name: row[name] for name in QuotaLimits.names()})
    return QuotaRecord(row["tenant"], row["key_id"], limits, row["update_time"], row["updated_by"])


class QuotaStore:
    def __init__(self, database: Database):
        self.db = database

    def _key(self, tenant: str, key_id: str):
        return quotas.c.tenant == tenant, quotas.c.key_id == key_id

    def set(self, tenant: str, key_id: str, limits: QuotaLimits, *, actor: str) -> QuotaRecord:
        """Replaces the limits of the tenant (key_id "") or of one of its keys; limits with nothing set remove
        the row (back to the defaults). NOT_FOUND for a key the tenant does not own: another tenant's key id
        is not there for it."""
        limits.validated()
        now = time.time()
        with self.db.transaction() as c:
            if key_id:
                owner = c.execute(select(api_keys.c.tenant).where(api_keys.c.id == key_id)).scalar()
                if owner != tenant:
                    raise NotFound(f"key_id: no API key {key_id!r}")
            exists = c.execute(select(quotas.c.tenant).where(*self._key(tenant, key_id)).with_for_update()).first()
            if limits.empty:
                c.execute(delete(quotas).where(*self._key(tenant, key_id)))
                return QuotaRecord(tenant, key_id, limits, now, actor)
            values = dict(limits.as_dict(), update_time=now, updated_by=actor)
            if exists:
                c.execute(update(quotas).where(*self._key(tenant, key_id)).values(**values))
            else:
                c.execute(insert(quotas).values(tenant=tenant, key_id=key_id, **values))
        return self.get(tenant, key_id)

    def get(self, tenant: str, key_id: str = "") -> QuotaRecord:
        """The stored limits (none set when there is no row)."""
        with self.db.read() as c:
            row = c.execute(select(quotas).where(*self._key(tenant, key_id))).mappings().first()
        return _record(row) if row else QuotaRecord(tenant, key_id, QuotaLimits(), 0.0, "")

    def list(self, tenant: str) -> list[QuotaRecord]:
        """The tenant's rows: its own limits first, then its keys' overrides."""
        with self.db.read() as c:
            rows = c.execute(select(quotas).where(quotas.c.tenant == tenant).order_by(quotas.c.key_id)
                             ).mappings().all()
        return [_record(r) for r in rows]

    def all(self) -> list[QuotaRecord]:
        """Every row: what each gateway replica keeps in memory (reloaded every few seconds)."""
        with self.db.read() as c:
            rows = c.execute(select(quotas)).mappings().all()
        return [_record(r) for r in rows]

    # -- usage the records hold ------------------------------------------------------------------

    def unfinished_jobs(self, tenant: str) -> int:
        with self.db.read() as c:
            return c.execute(select(func.count()).select_from(jobs).where(
                jobs.c.tenant == tenant, jobs.c.state.in_(_UNFINISHED_JOBS))).scalar_one()

    def unfinished_evaluations(self, tenant: str) -> int:
        with self.db.read() as c:
            return c.execute(select(func.count()).select_from(evaluations).where(
                evaluations.c.tenant == tenant, evaluations.c.state.in_(_UNFINISHED_EVALUATIONS))).scalar_one()

    def stored_bytes(self, tenant: str) -> int:
        with self.db.read() as c:
            return int(c.execute(select(func.coalesce(func.sum(datasets.c.size_bytes), 0)).where(
                datasets.c.tenant == tenant)).scalar_one())
