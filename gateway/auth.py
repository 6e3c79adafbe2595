"""API keys -> tenant and scopes. Keys are stored only as SHA-256 hashes and compared in constant time."""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ragtune.errors import PermissionDenied, Unauthenticated
from ragtune.tenancy import is_valid_tenant


class Scope(str, enum.Enum):
    READ = "read"
    INGEST = "ingest"
    TRAIN = "train"
    ADMIN = "admin"  # implies every other scope


@dataclass(frozen=True)
class Principal:
    tenant: str
    scopes: frozenset[Scope]

    def require(self, scope: Scope) -> None:
        if scope not in self.scopes and Scope.ADMIN not in self.scopes:
            raise PermissionDenied(f"this API key lacks the '{scope.value}' scope")


@dataclass(frozen=True)
class _KeyEntry:
    digest: bytes
    principal: Principal


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key_entry(tenant: str, scopes: Iterable[str]) -> tuple[str, dict]:
    """A fresh random key and the hashed entry to put in the keys file (the key itself is not stored)."""
    key = "rt_" + secrets.token_urlsafe(32)
    return key, {"sha256": hash_key(key), "tenant": tenant, "scopes": sorted(set(scopes))}


class ApiKeyStore:
    def __init__(self, entries: list[_KeyEntry]):
        self._entries = entries

    @classmethod
    def from_json(cls, text: str, source: str = "api keys") -> "ApiKeyStore":
        data = json.loads(text)
        entries = []
        for i, item in enumerate(data.get("keys", [])):
            tenant = item.get("tenant", "")
            if not is_valid_tenant(tenant):
                raise ValueError(f"{source}: keys[{i}].tenant {tenant!r} is not a valid tenant id")
            digest = item.get("sha256", "")
            if len(digest) != 64:
                raise ValueError(f"{source}: keys[{i}].sha256 must be a hex SHA-256 of the key")
            try:
                scopes = frozenset(Scope(s) for s in item.get("scopes", []))
            except ValueError as exc:
                raise ValueError(f"{source}: keys[{i}].scopes: {exc}") from None
            entries.append(_KeyEntry(bytes.fromhex(digest), Principal(tenant, scopes)))
        return cls(entries)

    @classmethod
    def load(cls, file: Path | None, inline: str | None) -> "ApiKeyStore":
        entries: list[_KeyEntry] = []
        if file is not None:
            entries += cls.from_json(Path(file).read_text(), str(file))._entries
        if inline:
            entries += cls.from_json(inline, "RAGTUNE_GATEWAY_API_KEYS")._entries
        return cls(entries)

    def __len__(self) -> int:
        return len(self._entries)

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
        found = None
        for entry in self._entries:  # no early exit: the time taken does not depend on which key matched
            if hmac.compare_digest(entry.digest, digest):
                found = entry.principal
        if found is None:
            raise Unauthenticated("invalid API key")
        return found
