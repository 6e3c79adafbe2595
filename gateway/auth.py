"""API keys -> tenant and scopes. Keys live hashed in the control-plane database; every replica keeps
the active set in memory and reloads it every RAGTUNE_GATEWAY_KEY_REFRESH_S seconds, so a revoked
key is refused everywhere within that bound, with no database round trip on the request path."""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from ragtune.controlplane.api_keys import ActiveKey, ApiKeyStore
from ragtune.errors import PermissionDenied, ServiceError, Unauthenticated

log = logging.getLogger(__name__)


class Scope(str, enum.Enum):
    READ = "read"
    INGEST = "ingest"
    TRAIN = "train"
    ADMIN = "admin"  # implies every other scope


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
    is constant-time all the same."""

    def __init__(self, keys: Iterable[ActiveKey] = ()):
        self.replace(keys)

    def replace(self, keys: Iterable[ActiveKey]) -> None:
        self._by_digest = {
            bytes.fromhex(k.sha256): Principal(k.tenant, frozenset(Scope(s) for s in k.scopes), k.id) for k in keys
        }

    def __len__(self) -> int:
        return len(self._by_digest)

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
        digest = hashlib.sha256(key.encode()).digest()
        principal = self._by_digest.get(digest)
        stored = digest if principal is not None else b"\0" * len(digest)
        if principal is None or not hmac.compare_digest(stored, digest):
            raise Unauthenticated("invalid API key")
        return principal


class KeyRefresher:
    """Reloads a KeyRing from the database on a fixed period. While the database is unreachable the
    last loaded keys stay in force (requests keep being served; revocations wait for it)."""

    def __init__(self, store: ApiKeyStore, ring: KeyRing, period_s: float):
        self._store, self._ring, self._period = store, ring, period_s
        self._task: asyncio.Task | None = None

    async def load(self) -> None:
        self._ring.replace(await asyncio.to_thread(self._store.active))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._period)
            try:
                await self.load()
            except ServiceError as error:
                log.warning("API keys not refreshed: %s", error.message)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="api-key-refresh")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
