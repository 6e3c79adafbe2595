"""`ApiKeyStore`: API keys as data. Only SHA-256 hashes are kept; a key is shown once, when made.
A keys file (JSON of hashed entries) remains as a bootstrap import."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import exc, insert, select, update

from ragtune.controlplane.database import Database
from ragtune.controlplane.schema import api_keys
from ragtune.errors import NotFound
from ragtune.tenancy import is_valid_tenant

SCOPES = ("read", "ingest", "train", "admin")
KEY_PREFIX = "rt_"


@dataclass(frozen=True)
class ApiKeyRecord:
    id: str
    tenant: str
    scopes: tuple[str, ...]
    name: str
    prefix: str
    source: str
    create_time: float
    revoke_time: float | None

    @property
    def revoked(self) -> bool:
        return self.revoke_time is not None


@dataclass(frozen=True)
class ActiveKey:
    sha256: str
    tenant: str
    scopes: tuple[str, ...]
    id: str = ""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key_entry(tenant: str, scopes: Iterable[str]) -> tuple[str, dict]:
    """A fresh random key and its hashed keys-file entry (the key itself is not stored)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, {"sha256": hash_key(key), "tenant": tenant, "scopes": sorted(set(scopes))}


def parse_key_entries(text: str, source: str = "api keys") -> list[ActiveKey]:
    """Validates a keys file: {"keys": [{"sha256", "tenant", "scopes"}]}; ValueError names the entry."""
    data = json.loads(text)
    entries = []
    for i, item in enumerate(data.get("keys", [])):
        tenant = item.get("tenant", "")
        if not is_valid_tenant(tenant):
            raise ValueError(f"{source}: keys[{i}].tenant {tenant!r} is not a valid tenant id")
        digest = item.get("sha256", "")
        if len(digest) != 64 or any(ch not in "0123456789abcdef" for ch in digest.lower()):
            raise ValueError(f"{source}: keys[{i}].sha256 must be a hex SHA-256 of the key")
        scopes = item.get("scopes", [])
        unknown = [s for s in scopes if s not in SCOPES]
        if unknown:
            raise ValueError(f"{source}: keys[{i}].scopes: unknown scope(s) {unknown}; known: {list(SCOPES)}")
        entries.append(ActiveKey(digest.lower(), tenant, tuple(sorted(set(scopes)))))
    return entries


def load_key_file(file: Path | None, inline: str | None) -> list[ActiveKey]:
    entries: list[ActiveKey] = []
    if file is not None:
        entries += parse_key_entries(Path(file).read_text(), str(file))
    if inline:
        entries += parse_key_entries(inline, "RAGTUNE_GATEWAY_API_KEYS")
    return entries


def _record(row) -> ApiKeyRecord:
    return ApiKeyRecord(row["id"], row["tenant"], tuple(row["scopes"]), row["name"], row["prefix"], row["source"],
                        row["create_time"], row["revoke_time"])


class ApiKeyStore:
    def __init__(self, database: Database):
        self.db = database

    def create(self, tenant: str, scopes: Iterable[str], name: str = "") -> tuple[str, ApiKeyRecord]:
        """A new key for the tenant: returns the key (shown once) and its record."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        row = dict(id="key-" + uuid.uuid4().hex[:16], sha256=hash_key(key), tenant=tenant,
                   scopes=sorted(set(scopes)), name=name, prefix=key[:8], source="api",
                   create_time=time.time(), revoke_time=None)
        with self.db.transaction() as c:
            c.execute(insert(api_keys).values(**row))
        return key, _record(row)

    def import_entries(self, entries: Iterable[ActiveKey], source: str = "file") -> int:
        """Adds the hashed entries not already known (revoked ones stay revoked); returns how many."""
        added = 0
        for entry in entries:
            try:
                with self.db.transaction() as c:
                    if c.execute(select(api_keys.c.id).where(api_keys.c.sha256 == entry.sha256)).first():
                        continue
                    c.execute(insert(api_keys).values(
                        id="key-" + entry.sha256[:16], sha256=entry.sha256, tenant=entry.tenant,
                        scopes=list(entry.scopes), name=source, prefix="", source=source,
                        create_time=time.time(), revoke_time=None))
                added += 1
            except exc.IntegrityError:
                continue  # another replica imported the same file at the same moment
        return added

    def list(self, tenant: str, include_revoked: bool = False) -> list[ApiKeyRecord]:
        query = select(api_keys).where(api_keys.c.tenant == tenant)
        if not include_revoked:
            query = query.where(api_keys.c.revoke_time.is_(None))
        with self.db.read() as c:
            rows = c.execute(query.order_by(api_keys.c.create_time, api_keys.c.id)).mappings().all()
        return [_record(r) for r in rows]

    def revoke(self, tenant: str, key_id: str) -> ApiKeyRecord:
        """Revokes one of the tenant's keys (idempotent); NOT_FOUND for another tenant's key."""
        with self.db.transaction() as c:
            row = c.execute(select(api_keys).where(api_keys.c.id == key_id)).mappings().first()
            if row is None or row["tenant"] != tenant:
                raise NotFound(f"id: no API key {key_id!r}")
            if row["revoke_time"] is None:
                c.execute(update(api_keys).where(api_keys.c.id == key_id).values(revoke_time=time.time()))
            row = c.execute(select(api_keys).where(api_keys.c.id == key_id)).mappings().first()
        return _record(row)

    def active(self) -> list[ActiveKey]:
        """Every key not revoked: what the gateways authenticate against (reloaded every few seconds)."""
        with self.db.read() as c:
            rows = c.execute(select(api_keys.c.sha256, api_keys.c.tenant, api_keys.c.scopes, api_keys.c.id)
                             .where(api_keys.c.revoke_time.is_(None))).all()
        return [ActiveKey(r.sha256, r.tenant, tuple(r.scopes), r.id) for r in rows]
