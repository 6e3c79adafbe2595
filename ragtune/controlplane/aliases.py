"""`AliasStore`: named pointers (prod, canary, ...) from a tenant's adapter to a version, or to a
weighted split of two versions (a canary), moved atomically and audited: every move records who,
when, from what, to what and why, and a rollback returns to what the alias pointed at before."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from sqlalchemy import delete, insert, select, update

from ragtune.naming import ALIAS_NAME
from ragtune.controlplane.database import Database
from ragtune.controlplane.schema import adapter_alias_events, adapter_aliases
from ragtune.errors import FailedPrecondition, InvalidArgument, NotFound

MAX_TARGETS = 2  # one version, or a canary between two


@dataclass(frozen=True)
class Target:
    version: int
    weight: int  # a share out of the targets' total


@dataclass(frozen=True)
class AliasRecord:
    tenant: str
    adapter: str
    alias: str
    targets: tuple[Target, ...]
    revision: int
    update_time: float

    def pick(self, rng: random.Random | None = None) -> int:
        """The version one request goes to, drawn by weight."""
        if len(self.targets) == 1:
            return self.targets[0].version
        versions = [t.version for t in self.targets]
        return (rng or random).choices(versions, weights=[t.weight for t in self.targets])[0]


@dataclass(frozen=True)
class AliasEvent:
    time: float
    action: str
    actor: str
    reason: str
    from_targets: tuple[Target, ...]
    to_targets: tuple[Target, ...]


def validate_alias(alias: str, field: str = "alias") -> str:
    return ALIAS_NAME.check(alias, field)


def validate_targets(targets: list[Target], field: str = "targets") -> tuple[Target, ...]:
    if not 1 <= len(targets) <= MAX_TARGETS:
        raise InvalidArgument(field, f"name one version, or two with weights for a canary (got {len(targets)})")
    if len({t.version for t in targets}) != len(targets):
        raise InvalidArgument(field, "a version may appear only once")
    for i, t in enumerate(targets):
        if t.version < 1:
            raise InvalidArgument(f"{field}[{i}].version", "must be a published version (1 or more)")
        if not 0 <= t.weight <= 100 or (len(targets) > 1 and t.weight == 0):
            raise InvalidArgument(f"{field}[{i}].weight", "must be 1 to 100 in a split")
    if len(targets) == 1:
        return (Target(targets[0].version, 100),)
    return tuple(targets)


def _targets(data) -> tuple[Target, ...]:
    return tuple(Target(int(t["version"]), int(t["weight"])) for t in data or ())


def _data(targets: tuple[Target, ...]) -> list[dict]:
    return [{"version": t.version, "weight": t.weight} for t in targets]


def _record(row) -> AliasRecord:
    return AliasRecord(row["tenant"], row["adapter"], row["alias"], _targets(row["targets"]), row["revision"],
                       row["update_time"])


class AliasStore:
    def __init__(self, database: Database):
        self.db = database

    def _key(self, tenant: str, adapter: str, alias: str):
        return (adapter_aliases.c.tenant == tenant, adapter_aliases.c.adapter == adapter,
                adapter_aliases.c.alias == alias)

    def set(self, tenant: str, adapter: str, alias: str, targets: list[Target], *, actor: str, reason: str = "",
            action: str = "set") -> AliasRecord:
        """Points the alias at the targets in one transaction, with its audit event."""
        validate_alias(alias)
        new = validate_targets(targets)
        now = time.time()
        with self.db.transaction() as c:
            row = c.execute(select(adapter_aliases).where(*self._key(tenant, adapter, alias)).with_for_update()
                            ).mappings().first()
            old = _targets(row["targets"]) if row else ()
            if row is None:
                c.execute(insert(adapter_aliases).values(tenant=tenant, adapter=adapter, alias=alias,
                                                         targets=_data(new), revision=1, update_time=now))
            else:
                c.execute(update(adapter_aliases).where(*self._key(tenant, adapter, alias)).values(
                    targets=_data(new), revision=adapter_aliases.c.revision + 1, update_time=now))
            c.execute(insert(adapter_alias_events).values(
                tenant=tenant, adapter=adapter, alias=alias, time=now, action=action, actor=actor, reason=reason,
                from_targets=_data(old) if old else None, to_targets=_data(new)))
        return self.get(tenant, adapter, alias)

    def get(self, tenant: str, adapter: str, alias: str) -> AliasRecord:
        with self.db.read() as c:
            row = c.execute(select(adapter_aliases).where(*self._key(tenant, adapter, alias))).mappings().first()
        if row is None:
            raise NotFound(f"alias: adapter {adapter!r} has no alias {alias!r}")
        return _record(row)

    def list(self, tenant: str, adapter: str | None = None) -> list[AliasRecord]:
        query = select(adapter_aliases).where(adapter_aliases.c.tenant == tenant)
        if adapter is not None:
            query = query.where(adapter_aliases.c.adapter == adapter)
        with self.db.read() as c:
            rows = c.execute(query.order_by(adapter_aliases.c.adapter, adapter_aliases.c.alias)).mappings().all()
        return [_record(r) for r in rows]

    def history(self, tenant: str, adapter: str, alias: str) -> list[AliasEvent]:
        with self.db.read() as c:
            rows = c.execute(select(adapter_alias_events).where(
                adapter_alias_events.c.tenant == tenant, adapter_alias_events.c.adapter == adapter,
                adapter_alias_events.c.alias == alias).order_by(adapter_alias_events.c.id)).mappings().all()
        return [AliasEvent(r["time"], r["action"], r["actor"], r["reason"], _targets(r["from_targets"]),
                           _targets(r["to_targets"])) for r in rows]

    def rollback(self, tenant: str, adapter: str, alias: str, *, actor: str, reason: str = "") -> AliasRecord:
        """Moves the alias back to what it pointed at before its last move."""
        current = self.get(tenant, adapter, alias)
        events = self.history(tenant, adapter, alias)
        previous = events[-1].from_targets if events else ()
        if not previous:
            raise FailedPrecondition(f"alias {alias!r} of {adapter!r} has no earlier target to roll back to")
        return self.set(tenant, adapter, alias, list(previous), actor=actor,
                        reason=reason or f"rollback from revision {current.revision}", action="rollback")

    def delete(self, tenant: str, adapter: str, alias: str, *, actor: str, reason: str = "") -> None:
        current = self.get(tenant, adapter, alias)
        with self.db.transaction() as c:
            c.execute(delete(adapter_aliases).where(*self._key(tenant, adapter, alias)))
            c.execute(insert(adapter_alias_events).values(
                tenant=tenant, adapter=adapter, alias=alias, time=time.time(), action="delete", actor=actor,
                reason=reason, from_targets=_data(current.targets), to_targets=None))
