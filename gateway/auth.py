"""API keys -> tenant and scopes. Keys live hashed in the control-plane database; every replica keeps
the active set in memory and reloads it every RAGTUNE_GATEWAY_KEY_REFRESH_S seconds, so a revoked
key is refused everywhere within that bound, with no database round trip on the request path.
A replica that cannot reload for longer than RAGTUNE_GATEWAY_KEY_MAX_STALENESS_S refuses every key
(UNAVAILABLE) instead of trusting a set that may still hold revoked keys."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from ragtune.access import Scope  # declared with the access table; re-exported for the key code
from ragtune.controlplane.api_keys import ActiveKey, ApiKeyStore, UnusableKey
from ragtune.errors import PermissionDenied, ServiceError, Unauthenticated, Unavailable

log = logging.getLogger(__name__)

MAX_STALENESS_SETTING = "RAGTUNE_GATEWAY_KEY_MAX_STALENESS_S"
STALENESS_METRIC = "ragtune.gateway.api_keys.staleness"


@dataclass(frozen=True)
class Principal:
    tenant: str
    scopes: frozenset[Scope]
    key_id: str = ""  # recorded as the actor in audit trails

    def require(self, scope: Scope) -> None:
        if scope not in self.scopes and Scope.ADMIN not in self.scopes:
            raise PermissionDenied(f"this API key lacks the '{scope.value}' scope")


class KeyRing:
    """The active keys by SHA-256 digest. Looking up the digest of the presented key reveals nothing
    about stored keys through timing (the digest is not attacker-controlled); the final comparison
    is constant-time all the same. It knows when it was last loaded: older than `max_staleness_s`, it
    answers UNAVAILABLE for every key, because revocations made since may be missing from it."""

    def __init__(self, keys: Iterable[ActiveKey] = (), *, max_staleness_s: float | None = None,
                 retry_after_s: float = 1.0):
        self.max_staleness_s = max_staleness_s
        self._retry_after_s = retry_after_s  # the refresh period: when a retry may find the keys reloaded
        self.replace(keys)

    def replace(self, keys: Iterable[ActiveKey]) -> list[UnusableKey]:
        """Swaps in a freshly loaded set and marks it fresh. A key that cannot be used (an unknown scope,
        a malformed digest) is left out and returned, so it never keeps the others from loading."""
        by_digest, skipped = {}, []
        for key in keys:
            try:
                digest = bytes.fromhex(key.sha256)
                if len(digest) != hashlib.sha256().digest_size:
                    raise ValueError("sha256 is not a SHA-256 digest")
                by_digest[digest] = Principal(key.tenant, frozenset(Scope(s) for s in key.scopes), key.id)
            except (TypeError, ValueError) as error:
                skipped.append(UnusableKey(key.id, str(error)))
        self._by_digest = by_digest
        self._loaded_at = time.monotonic()  # monotonic: a wall-clock step must not make the view look fresh
        return skipped

    def __len__(self) -> int:
        return len(self._by_digest)

    @property
    def age_s(self) -> float:
        """Seconds since the keys were last loaded."""
        return time.monotonic() - self._loaded_at

    def stale_reason(self) -> str | None:
        """Why the keys may not be trusted any more (older than max_staleness_s); None while they may."""
        age = self.age_s
        if self.max_staleness_s is None or age <= self.max_staleness_s:
            return None
        limit = f"{MAX_STALENESS_SETTING}={self.max_staleness_s:g} s"
        return f"API keys could not be refreshed for {age:.1f} s (limit {limit})"

    def authenticate(self, metadata: Iterable[tuple[str, str]]) -> Principal:
        """Finds the principal of the key in `authorization: Bearer <key>` (or `x-api-key`)."""
        md = dict(metadata or ())
        key = md.get("x-api-key", "")
        auth = md.get("authorization", "")
        if auth:
            scheme, _, value = auth.partition(" ")
            if scheme.lower() != "bearer" or not value:
                raise Unauthenticated("the authorization metadata must be 'Bearer <api key>'")
            key = value.strip()
        if not key:
            raise Unauthenticated("missing API key: send 'authorization: Bearer <api key>'")
        stale = self.stale_reason()
        if stale is not None:
            raise Unavailable(f"{stale}; retry shortly", retry_after_s=self._retry_after_s)
        digest = hashlib.sha256(key.encode()).digest()
        principal = self._by_digest.get(digest)
        stored = digest if principal is not None else b"\0" * len(digest)
        if principal is None or not hmac.compare_digest(stored, digest):
            raise Unauthenticated("invalid API key")
        return principal


# OpenTelemetry keeps the first callback registered under an instrument name for the life of the
# process, so one callback reads every refresher running in it (one per gateway; tests run several).
_running: weakref.WeakSet[KeyRefresher] = weakref.WeakSet()
_global_gauge: object | None = None


def _observe_staleness(_options: CallbackOptions):
    for refresher in list(_running):
        yield Observation(refresher.age_s)


def register_staleness_gauge(meter: metrics.Meter | None = None):
    """The gauge `ragtune.gateway.api_keys.staleness`: seconds since each running refresher's last
    successful load, on `meter` (default: the process's meter provider)."""
    meter = meter or metrics.get_meter("ragtune.gateway")
    return meter.create_observable_gauge(
        STALENESS_METRIC, callbacks=[_observe_staleness], unit="s",
        description=f"Seconds since the API keys were last loaded; past {MAX_STALENESS_SETTING} every key is refused.",
    )


class KeyRefresher:
    """Reloads a KeyRing from the database every period. Any failure (the database down, a pool timeout,
    a bug) is logged and tried again the next period: the loop ends only on stop(). While it fails, the
    ring keeps the last loaded keys until they are older than its max_staleness_s, then refuses them all."""

    def __init__(self, store: ApiKeyStore, ring: KeyRing, period_s: float):
        self._store, self._ring, self._period = store, ring, period_s
        self._task: asyncio.Task | None = None
        self.failures = 0  # consecutive failed loads
        self.last_error = ""
        self.unusable: tuple[UnusableKey, ...] = ()  # rows the last load skipped
        self._reported: set[UnusableKey] = set()
        self._refusing = False  # the stale view has been logged
        self._attempt_done = asyncio.Event()

    @property
    def age_s(self) -> float:
        """Seconds since the last successful load."""
        return self._ring.age_s

    def stale_reason(self) -> str | None:
        return self._ring.stale_reason()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def load(self) -> None:
        """One load; raises what loading raised (the load at start must succeed)."""
        loaded = await asyncio.to_thread(self._store.load_active)
        skipped = self._ring.replace(loaded.keys)
        self._note_unusable((*loaded.unusable, *skipped))

    def _note_unusable(self, unusable: tuple[UnusableKey, ...]) -> None:
        # Logged once per row and reason, not every period, so the log stays readable.
        for key in unusable:
            if key not in self._reported:
                log.warning("API key %s skipped (the other keys are loaded): %s", key.id, key.reason)
        self._reported = set(unusable)
        self.unusable = unusable

    async def next_attempt(self) -> None:
        """Returns when the next periodic load has been tried (succeeded or not)."""
        await self._attempt_done.wait()

    async def _attempt(self) -> None:
        try:
            await self.load()
        except Exception as error:  # noqa: BLE001 - whatever failed, the next period retries; the ring bounds staleness
            self._failed(error)
        else:
            if self.failures:
                log.info("API keys refreshed again after %d failed attempt(s)", self.failures)
            self.failures, self.last_error, self._refusing = 0, "", False
        finally:
            done, self._attempt_done = self._attempt_done, asyncio.Event()
            done.set()

    def _failed(self, error: Exception) -> None:
        self.failures += 1
        message = error.message if isinstance(error, ServiceError) else f"{type(error).__name__}: {error}"
        if self.failures == 1 or message != self.last_error:
            # A traceback only for what is not a known condition (a bug, a driver error): it is what to fix.
            log.warning("API keys not refreshed (%.1f s old, retrying every %g s): %s", self.age_s, self._period,
                        message, exc_info=not isinstance(error, ServiceError))
        stale = self.stale_reason()
        if stale is not None and not self._refusing:
            log.error("%s: every API key is refused until they load again", stale)
        self._refusing = stale is not None
        self.last_error = message

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._period)
            await self._attempt()

    def start(self) -> None:
        global _global_gauge
        if _global_gauge is None:
            _global_gauge = register_staleness_gauge()
        _running.add(self)
        self._task = asyncio.create_task(self._loop(), name="api-key-refresh")

    async def stop(self) -> None:
        _running.discard(self)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
