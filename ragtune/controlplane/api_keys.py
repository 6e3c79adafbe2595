"""`ApiKeyStore`: API keys as data. Only SHA-256 hashes are kept; a key is shown once, when made.
A keys file (JSON of hashed entries) remains as a bootstrap import: when one is configured it is the
whole truth for the keys it brought (source "file"), so a key taken out of it is revoked at the next
start; keys made through the API (source "api") are never touched by it."""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Text, cast, exc, insert, select, update

from ragtune.controlplane.database import Database
from ragtune.controlplane.schema import api_keys
from ragtune.errors import NotFound
from ragtune.tenancy import is_valid_tenant

log = logging.getLogger(__name__)

SCOPES = ("read", "ingest", "train", "admin")
KEY_PREFIX = "rt_"
FILE_SOURCE = "file"


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


@dataclass(frozen=True)
class UnusableKey:
    """An active row that cannot be a key (edited by hand, or written by a newer version): skipped, so one
    bad row never keeps the other keys from loading."""

    id: str
    reason: str


@dataclass(frozen=True)
class ActiveKeys:
    keys: list[ActiveKey]
    unusable: list[UnusableKey]


@dataclass(frozen=True)
class KeyImport:
    """What applying a keys file changed: keys added, and ids of file keys revoked because the file no
    longer lists them."""

    added: int
    revoked: tuple[str, ...] = ()


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key_entry(tenant: str, scopes: Iterable[str]) -> tuple[str, dict]:
    """A fresh random key and its hashed keys-file entry (the key itself is not stored)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, {"sha256": hash_key(key), "tenant": tenant, "scopes": sorted(set(scopes))}


def entry_problem(digest: object, tenant: object, scopes: object) -> tuple[str, str] | None:
    """The field and why these values cannot be a key (None when they can): one rule for the keys file
    and for the rows the gateways load."""
    if not isinstance(tenant, str) or not is_valid_tenant(tenant):
        return "tenant", f"{tenant!r} is not a valid tenant id"
    if not isinstance(digest, str) or len(digest) != 64 or any(ch not in "0123456789abcdef" for ch in digest.lower()):
        return "sha256", "must be a hex SHA-256 of the key"
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        return "scopes", f"must be a list of scope names, not {scopes!r}"
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        return "scopes", f"unknown scope(s) {unknown}; known: {list(SCOPES)}"
    return None


def parse_key_entries(text: str, source: str = "api keys") -> list[ActiveKey]:
    """Validates a keys file: {"keys": [{"sha256", "tenant", "scopes"}]}; ValueError names the entry.
    The "keys" list is required: the file is the whole truth for its keys, so a file that lost it must
    stop the gateway at start rather than read as "no keys" and revoke them all."""
    try:
        data = json.loads(text)
    except ValueError as error:
        raise ValueError(f"{source}: is not valid JSON ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError(f'{source}: must be a JSON object with a "keys" list ({{"keys": []}} for none)')
    entries = []
    for i, item in enumerate(data["keys"]):
        if not isinstance(item, dict):
            raise ValueError(f"{source}: keys[{i}] must be an object with sha256, tenant and scopes")
        digest, tenant, scopes = item.get("sha256", ""), item.get("tenant", ""), item.get("scopes", [])
        problem = entry_problem(digest, tenant, scopes)
        if problem is not None:
            raise ValueError(f"{source}: keys[{i}].{problem[0]}: {problem[1]}")
        entries.append(ActiveKey(digest.lower(), tenant, tuple(sorted(set(scopes)))))
    return entries


def load_key_file(file: Path | None, inline: str | None) -> list[ActiveKey] | None:
    """The bootstrap keys of the file and the inline JSON together; None when neither is configured
    (then the keys of source "file" are left as they are)."""
    if file is None and not inline:
        return None
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

    def import_entries(self, entries: Iterable[ActiveKey], source: str = FILE_SOURCE) -> KeyImport:
        """Applies a bootstrap keys file: adds the entries not already known, and revokes the active keys
        of this source that the file no longer lists. A key revoked once stays revoked even if the file
        lists it again (a copy of an old file must not bring back a key taken out because it leaked):
        issue a new one. Keys of other sources (made through the API) are never touched."""
        entries = list(entries)
        listed = {entry.sha256 for entry in entries}
        added = 0
        for entry in entries:
            try:
                with self.db.transaction() as c:
                    known = c.execute(select(api_keys.c.id, api_keys.c.revoke_time, api_keys.c.source)
                                      .where(api_keys.c.sha256 == entry.sha256)).first()
                    if known is not None:
                        if known.revoke_time is not None and known.source == source:
                            log.warning("API key %s is in the keys file but was revoked: it stays revoked"
                                        " (make a new key to replace it)", known.id)
                        continue
                    c.execute(insert(api_keys).values(
                        id="key-" + entry.sha256[:16], sha256=entry.sha256, tenant=entry.tenant,
                        scopes=list(entry.scopes), name=source, prefix="", source=source,
                        create_time=time.time(), revoke_time=None))
                added += 1
            except exc.IntegrityError:
                continue  # another replica imported the same file at the same moment
        with self.db.transaction() as c:
            active = c.execute(select(api_keys.c.id, api_keys.c.sha256)
                               .where(api_keys.c.source == source, api_keys.c.revoke_time.is_(None))).all()
            gone = tuple(sorted(row.id for row in active if row.sha256 not in listed))
            if gone:
                # `revoke_time IS NULL` keeps the first revocation's time when replicas start together.
                c.execute(update(api_keys).where(api_keys.c.id.in_(gone), api_keys.c.revoke_time.is_(None))
                          .values(revoke_time=time.time()))
        if gone:
            log.warning("revoked %d API key(s) no longer in the keys file: %s", len(gone), ", ".join(gone))
        return KeyImport(added, gone)

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
        """Every usable key not revoked (rows that cannot be a key are left out: see load_active)."""
        return self.load_active().keys

    def load_active(self) -> ActiveKeys:
        """Every key not revoked: what the gateways authenticate against (reloaded every few seconds).
        Each row is checked on its own, and scopes are read as text and decoded here, so one malformed row
        (an unknown scope, a bad digest, scopes that are not JSON) is reported apart instead of failing
        the whole load."""
        with self.db.read() as c:
            rows = c.execute(select(api_keys.c.sha256, api_keys.c.tenant, cast(api_keys.c.scopes, Text).label("scopes"),
                                    api_keys.c.id)
                             .where(api_keys.c.revoke_time.is_(None))).all()
        keys, unusable = [], []
        for row in rows:
            try:
                scopes = json.loads(row.scopes)
            except (TypeError, ValueError):
                unusable.append(UnusableKey(row.id, "scopes are not JSON"))
                continue
            problem = entry_problem(row.sha256, row.tenant, scopes)
            if problem is not None:
                unusable.append(UnusableKey(row.id, f"{problem[0]}: {problem[1]}"))
                continue
            keys.append(ActiveKey(row.sha256.lower(), row.tenant, tuple(scopes), row.id))
        return ActiveKeys(keys, unusable)
