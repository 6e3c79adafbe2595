"""`AliasResolver`: turns "<name>@<alias>" into the version the alias serves, per request (a canary
split draws by weight each time). Each replica reads an alias from the control plane at most every
RAGTUNE_GENERATOR_ALIAS_REFRESH_S seconds: that is the bound within which every replica serves an
alias's new target, with no restart and no load call."""

from __future__ import annotations

import asyncio
import time

from ragtune.controlplane.aliases import AliasRecord, AliasStore


class AliasResolver:
    def __init__(self, store: AliasStore, refresh_s: float):
        self.store, self.refresh_s = store, refresh_s
        self._cache: dict[tuple[str, str, str], tuple[float, AliasRecord]] = {}

    async def resolve(self, tenant: str, name: str, alias: str) -> str:
        """"<name>/<version>" for this request; NOT_FOUND (from the store) for an unknown alias."""
        key = (tenant, name, alias)
        cached = self._cache.get(key)
        if cached is None or time.monotonic() - cached[0] > self.refresh_s:
            record = await asyncio.to_thread(self.store.get, tenant, name, alias)
            cached = (time.monotonic(), record)
            self._cache[key] = cached
        return f"{name}/{cached[1].pick()}"
