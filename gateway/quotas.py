"""Quota admission: each call of a tenant (and of a key with its own limits) is checked against its
requests per second, generated tokens per minute and open streams before its body is processed, and the
calls that add records against the tenant's unfinished jobs, evaluations and stored bytes. Over a limit:
`QuotaExceeded` (RESOURCE_EXHAUSTED with google.rpc.QuotaFailure and RetryInfo; HTTP 429 + Retry-After).

The limits come from the control plane (ragtune/controlplane/quotas.py), kept in memory and reloaded every
RAGTUNE_GATEWAY_QUOTA_REFRESH_S, so admission makes no database round trip. The counters live in this
process (one replica) or, with RAGTUNE_GATEWAY_QUOTA_REDIS_URL, in Redis where every replica sees them
(gateway/quota_counters.py)."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Any

from gateway.auth import Principal
from gateway.quota_counters import Counters, LocalCounters
from ragtune.controlplane.quotas import QuotaLimits, QuotaRecord, QuotaStore
from ragtune.errors import QuotaExceeded, QuotaViolation

log = logging.getLogger(__name__)

Release = Callable[[], None]

# RetryInfo for limits that free up only when work ends or data is deleted: when asking again makes sense.
_RECORD_RETRY_S = {"queued_jobs": 30.0, "running_evaluations": 30.0, "stored_bytes": 300.0}
_STREAM_RETRY_S = 1.0
_NEVER_RETRY_S = 60.0  # a limit of 0: nothing refills it; ask an admin


def default_limits(settings: Any) -> QuotaLimits:
    """Every tenant's limits unless the control plane says otherwise (gateway settings)."""
    return QuotaLimits(
        requests_per_s=settings.quota_requests_per_s,
        generated_tokens_per_min=settings.quota_generated_tokens_per_min,
        concurrent_streams=settings.quota_concurrent_streams,
        queued_jobs=settings.quota_queued_jobs,
        running_evaluations=settings.quota_running_evaluations,
        stored_bytes=settings.quota_stored_bytes,
    )


class QuotaAdmission:
    """`admit(principal, rule)` once per call after authentication; call the returned release when the call
    (or its stream) ends. `charge_tokens` after each answer; `check_records` where a job, an evaluation or a
    dataset is created."""

    def __init__(self, defaults: QuotaLimits, store: QuotaStore | None, *, burst_s: float = 2.0,
                 refresh_s: float = 5.0, counters: Counters | None = None):
        self.defaults = defaults
        self._store = store
        self._burst_s = burst_s
        self._refresh_s = refresh_s
        self.counters = counters or LocalCounters()
        self._rows: dict[tuple[str, str], QuotaLimits] = {}
        self._task: asyncio.Task | None = None

    @classmethod
    def from_settings(cls, settings: Any, store: QuotaStore | None) -> "QuotaAdmission":
        counters: Counters | None = None
        if settings.quota_redis_url is not None:
            from gateway.quota_counters import RedisCounters

            counters = RedisCounters(settings.quota_redis_url.get_secret_value())
        return cls(default_limits(settings), store, burst_s=settings.quota_burst_s,
                   refresh_s=settings.quota_refresh_s, counters=counters)

    # -- limits ----------------------------------------------------------------------------------

    async def load(self) -> None:
        if self._store is not None:
            records = await asyncio.to_thread(self._store.all)
            self._rows = {(r.tenant, r.key_id): r.limits for r in records}

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.load()
            except Exception as error:  # noqa: BLE001 - a database blip must not end the refresh for good
                log.warning("quotas not refreshed (the last loaded stay in force): %s", error)

    async def start(self) -> None:
        await self.load()
        self._task = asyncio.create_task(self._refresh_loop(), name="quota-refresh")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.counters.close()

    def remember(self, record: QuotaRecord) -> None:
        """Applies a change made through this replica at once (others pick it up at their next reload)."""
        if record.limits.empty:
            self._rows.pop((record.tenant, record.key_id), None)
        else:
            self._rows[(record.tenant, record.key_id)] = record.limits

    def tenant_limits(self, tenant: str) -> QuotaLimits:
        """What applies to the tenant: its own limits over the defaults."""
        return self._rows.get((tenant, ""), QuotaLimits()).over(self.defaults)

    def key_limits(self, key_id: str, tenant: str) -> QuotaLimits:
        """The key's own overrides only (unset: the tenant's limit alone applies)."""
        return self._rows.get((tenant, key_id), QuotaLimits()) if key_id else QuotaLimits()

    def _subjects(self, principal: Principal):
        """(subject, counter prefix, limits) for the tenant and, where it has overrides, the key."""
        found = [(f"tenant:{principal.tenant}", f"t:{principal.tenant}", self.tenant_limits(principal.tenant))]
        key = self.key_limits(principal.key_id, principal.tenant)
        if not key.empty:
            found.append((f"key:{principal.key_id}", f"k:{principal.key_id}", key))
        return found

    # -- admission -------------------------------------------------------------------------------

    async def admit(self, principal: Principal, rule: Any) -> Release:
        """Checks the call against its tenant's (and key's) limits; raises QuotaExceeded over one. `rule` is
        the method's access rule (ragtune/access.py): `generates` and `streams` say which limits apply."""
        subjects = self._subjects(principal)
        taken: list[tuple[str, float, float]] = []
        for subject, prefix, limits in reversed(subjects):  # the key's (narrower) bucket first
            rate = limits.requests_per_s
            if rate is None:
                continue
            bucket = (f"rps:{prefix}", rate, max(1.0, rate * self._burst_s))
            wait = await self.counters.take(*bucket)
            if wait > 0:
                for name, taken_rate, capacity in taken:  # a refused call costs no other bucket anything
                    self.counters.charge(name, taken_rate, capacity, -1.0)
                raise _exceeded(subject, f"requests_per_s: limit {rate:g} requests per second reached", wait)
            taken.append(bucket)
        if getattr(rule, "generates", False):
            for subject, prefix, limits in subjects:
                per_min = limits.generated_tokens_per_min
                if per_min is None:
                    continue
                wait = await self.counters.debt(f"tok:{prefix}", per_min / 60.0, float(per_min))
                if wait > 0:
                    raise _exceeded(subject, f"generated_tokens_per_min: limit {per_min} tokens per minute spent",
                                    wait)
        if not getattr(rule, "streams", False):
            return _nothing
        held: list[tuple[str, str]] = []
        try:
            for subject, prefix, limits in subjects:
                limit = limits.concurrent_streams
                if limit is None:
                    continue
                handle = await self.counters.hold(f"streams:{prefix}", limit)
                if handle is None:
                    raise _exceeded(subject, f"concurrent_streams: limit {limit} open streams reached",
                                    _STREAM_RETRY_S)
                held.append((f"streams:{prefix}", handle))
        except BaseException:
            for name, handle in held:
                self.counters.unhold(name, handle)
            raise
        return _release_once(self.counters, held)

    def charge_tokens(self, tenant: str, key_id: str, tokens: int) -> None:
        """Charges an answer's generated tokens to the tenant (and to the key where it has its own limit)."""
        if tokens <= 0:
            return
        for _subject, prefix, limits in self._subjects(Principal(tenant, frozenset(), key_id)):
            per_min = limits.generated_tokens_per_min
            if per_min is not None:
                self.counters.charge(f"tok:{prefix}", per_min / 60.0, float(per_min), float(tokens))

    async def check_records(self, principal: Principal, limit: str) -> None:
        """Before a call that adds a job (`queued_jobs`), an evaluation (`running_evaluations`) or stored data
        (`stored_bytes`): refuses it while the tenant already holds its limit's worth."""
        if self._store is None:
            return
        used = await asyncio.to_thread({
            "queued_jobs": self._store.unfinished_jobs,
            "running_evaluations": self._store.unfinished_evaluations,
            "stored_bytes": self._store.stored_bytes,
        }[limit], principal.tenant)
        for subject, _prefix, limits in self._subjects(principal):
            allowed = getattr(limits, limit)
            if allowed is not None and used >= allowed:
                unit = " bytes" if limit == "stored_bytes" else ""
                raise _exceeded(subject, f"{limit}: limit {allowed}{unit} reached (the tenant holds {used}{unit})",
                                _RECORD_RETRY_S[limit] if allowed else _NEVER_RETRY_S)


def _exceeded(subject: str, description: str, wait_s: float) -> QuotaExceeded:
    if not math.isfinite(wait_s):
        wait_s = _NEVER_RETRY_S
    return QuotaExceeded([QuotaViolation(subject, description)], retry_after_s=max(wait_s, 0.001))


def _nothing() -> None:
    return None


def _release_once(counters: Counters, held: list[tuple[str, str]]) -> Release:
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            for name, handle in held:
                counters.unhold(name, handle)

    return release
