"""`AliasResolver`: turns "<name>@<alias>" into the version the alias serves, per request (a canary
split draws by weight each time). Each replica reads an alias from the control plane at most every
RAGTUNE_GENERATOR_ALIAS_REFRESH_S seconds: that is the bound within which every replica serves an
alias's new target, with no restart and no load call.

When the control plane cannot be read, an alias this replica has read before keeps serving its last
known target (a warning says how old it is) and is tried again one refresh period later; only an
alias never read before fails, UNAVAILABLE. A read that finds no such alias is authoritative: the
alias was deleted, and NOT_FOUND is answered."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError

from ragtune.controlplane.aliases import AliasRecord, AliasStore
from ragtune.controlplane.database import DatabaseUnavailable
from ragtune.errors import NotFound, Unavailable

log = logging.getLogger(__name__)


@dataclass
class _Known:
    record: AliasRecord
    read_at: float  # monotonic time of the last successful read
    tried_at: float  # monotonic time of the last read attempt, failed or not


class AliasResolver:
    def __init__(self, store: AliasStore, refresh_s: float):
        self.store, self.refresh_s = store, refresh_s
        self._known: dict[tuple[str, str, str], _Known] = {}

    async def resolve(self, tenant: str, name: str, alias: str) -> str:
        """"<name>/<version>" for this request; NOT_FOUND for an alias the control plane does not have,
        UNAVAILABLE for one it cannot be asked about and this replica has never read."""
        key = (tenant, name, alias)
        known = self._known.get(key)
        now = time.monotonic()
        if known is not None and now - known.tried_at <= self.refresh_s:
            return f"{name}/{known.record.pick()}"
        if known is not None:
            # Requests arriving while this read runs serve the last known target instead of queueing
            # behind it (or, during an outage, each waiting out its own connect timeout).
            known.tried_at = now
        try:
            record = await asyncio.to_thread(self.store.get, tenant, name, alias)
        except NotFound:
            self._known.pop(key, None)
            raise
        except (DatabaseUnavailable, SQLAlchemyError) as exc:
            if known is None:
                raise Unavailable(f"adapter: alias {name}@{alias} cannot be resolved: the control-plane database"
                                  " is unavailable and this replica has not read the alias before; retry shortly"
                                  ) from exc
            log.warning("alias %s@%s of tenant %s: the control plane cannot be read (%s); serving its last known"
                        " target, read %.1f s ago", name, alias, tenant, type(exc).__name__,
                        time.monotonic() - known.read_at)
            return f"{name}/{known.record.pick()}"
        read_at = time.monotonic()
        self._known[key] = _Known(record, read_at, read_at)
        return f"{name}/{record.pick()}"

    def age_s(self, tenant: str, name: str, alias: str) -> float | None:
        """Seconds since the alias was last read successfully; None if it never was."""
        known = self._known.get((tenant, name, alias))
        return None if known is None else time.monotonic() - known.read_at
