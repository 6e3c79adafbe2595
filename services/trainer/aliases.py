"""Adapter aliases as the trainer serves them: moves are checked against the registry (an alias
never points at a version that does not exist), audited under the caller's name, and the
versions' listings show which aliases send them traffic."""

from __future__ import annotations

from dataclasses import dataclass

from ragtune.controlplane.aliases import AliasEvent, AliasRecord, AliasStore, Target, validate_alias
from ragtune.errors import InvalidArgument, NotFound
from ragtune.registry import AdapterRegistry, validate_name


@dataclass(frozen=True)
class AliasView:
    alias: AliasRecord
    history: list[AliasEvent]


class AdapterAliases:
    def __init__(self, registry: AdapterRegistry, store: AliasStore):
        self.registry, self.store = registry, store

    def set(self, tenant: str, adapter: str, alias: str, targets: list[Target], actor: str,
            reason: str = "") -> AliasRecord:
        validate_name(adapter, "adapter")
        validate_alias(alias)
        published = set(self.registry.versions(tenant, adapter))
        if not published:
            raise NotFound(f"adapter: no adapter named {adapter!r}")
        for i, target in enumerate(targets):
            if target.version not in published:
                raise NotFound(f"targets[{i}].version: adapter {adapter!r} has no version {target.version}")
        return self.store.set(tenant, adapter, alias, targets, actor=actor, reason=reason)

    def get(self, tenant: str, adapter: str, alias: str) -> AliasView:
        validate_name(adapter, "adapter")
        validate_alias(alias)
        return AliasView(self.store.get(tenant, adapter, alias), self.store.history(tenant, adapter, alias))

    def rollback(self, tenant: str, adapter: str, alias: str, actor: str, reason: str = "") -> AliasRecord:
        validate_name(adapter, "adapter")
        validate_alias(alias)
        return self.store.rollback(tenant, adapter, alias, actor=actor, reason=reason)

    def by_version(self, tenant: str) -> dict[tuple[str, int], list[str]]:
        """(adapter, version) -> the aliases sending it traffic, for ListAdapters."""
        found: dict[tuple[str, int], list[str]] = {}
        for record in self.store.list(tenant):
            for target in record.targets:
                found.setdefault((record.adapter, target.version), []).append(record.alias)
        return found

    def incumbent(self, tenant: str, adapter: str, alias: str) -> int:
        """The version an alias serves most of its traffic to; 0 when the alias does not exist yet."""
        try:
            record = self.store.get(tenant, adapter, alias)
        except NotFound:
            return 0
        return max(record.targets, key=lambda t: t.weight).version


def targets_of(pairs: list[tuple[int, int]]) -> list[Target]:
    if not pairs:
        raise InvalidArgument("targets", "name one version, or two with weights for a canary")
    return [Target(version, weight) for version, weight in pairs]
