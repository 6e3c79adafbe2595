"""The adapter registry: a folder tree `<root>/<tenant>/<name>/<version>/` that the trainer writes
and the generator reads.

Each version folder holds PEFT's `adapter_config.json` with safetensors weights and a
`ragtune.json` of metadata (base model, method, hyperparameters, dataset hash, metrics,
created time, and `content_sha256`, a digest of the adapter's files). Versions are published
atomically (written to a staging folder, then renamed), so a reader never sees a half-written
adapter. A version number is never handed out twice, even after its version is deleted: it comes
from the control plane's counter when the publisher has one, and never falls below the
`.last_version` mark kept beside the versions. Names are validated and every resolved path must
stay inside the root (no `..`, no absolute paths, no symlinks leading out).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

from ragtune.errors import InvalidArgument, NotFound
from ragtune.naming import RESOURCE_NAME

log = logging.getLogger(__name__)

METADATA_FILE = "ragtune.json"
CONTENT_DIGEST = "content_sha256"  # the metadata key of the digest of a version's files
_STAGING = ".staging"
_LAST_VERSION = ".last_version"  # beside the version folders: the highest number ever handed out


class VersionCounter(Protocol):
    """Where version numbers come from (ragtune.controlplane.adapter_versions.AdapterVersionCounter)."""

    def next(self, tenant: str, adapter: str, at_least: int = 0) -> int: ...


def content_digest(folder: Path) -> str:
    """sha256 over every file's relative path and bytes, metadata file excepted: a version folder
    whose weights changed gets another digest, so a server caching the old ones can tell."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative == METADATA_FILE:
            continue
        digest.update(relative.encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


@dataclass(frozen=True)
class AdapterVersion:
    tenant: str
    name: str
    version: int
    path: Path
    metadata: dict[str, Any]

    @property
    def registry_path(self) -> str:
        return f"{self.tenant}/{self.name}/{self.version}"


def parse_adapter_ref(ref: str, field: str = "adapter") -> tuple[str, int | None]:
    """Splits "<name>" or "<name>/<version>" and validates both parts (rejects '..', absolute paths)."""
    if not ref:
        raise InvalidArgument(field, "must not be empty")
    parts = ref.split("/")
    if len(parts) > 2 or not RESOURCE_NAME.matches(parts[0]):
        raise InvalidArgument(
            field, f"{ref!r} is not '<name>' or '<name>/<version>' (name: {RESOURCE_NAME.description})"
        )
    if len(parts) == 1:
        return parts[0], None
    if not parts[1].isdigit() or int(parts[1]) < 1:
        raise InvalidArgument(field, f"version in {ref!r} must be a positive integer")
    return parts[0], int(parts[1])


def parse_served_ref(ref: str, field: str = "adapter") -> tuple[str, int | None, str | None]:
    """What a request may name: "<name>", "<name>/<version>" or "<name>@<alias>"; returns
    (name, version or None, alias or None), each part validated."""
    from ragtune.controlplane.aliases import validate_alias

    name, at, alias = (ref or "").partition("@")
    if at:
        validate_name(name, field)
        validate_alias(alias, field)
        return name, None, alias
    name, version = parse_adapter_ref(ref, field)
    return name, version, None


def validate_name(name: str, field: str = "name") -> str:
    return RESOURCE_NAME.check(name, field)


class AdapterRegistry:
    def __init__(self, root: Path):
        self.root = Path(root)

    def _inside(self, path: Path, field: str) -> Path:
        real_root = self.root.resolve()
        real = path.resolve()
        if real != real_root and real_root not in real.parents:
            raise InvalidArgument(field, "resolves outside the adapter registry")
        return real

    def _name_dir(self, tenant: str, name: str) -> Path:
        return self.root / tenant / validate_name(name)

    def versions(self, tenant: str, name: str) -> list[int]:
        folder = self._name_dir(tenant, name)
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / METADATA_FILE).exists())

    def get(self, tenant: str, ref: str, field: str = "adapter") -> AdapterVersion:
        """Resolves "<name>" (newest) or "<name>/<version>" for a tenant; NOT_FOUND if absent."""
        name, version = parse_adapter_ref(ref, field)
        versions = self.versions(tenant, name)
        if not versions:
            raise NotFound(f"{field}: no adapter named {name!r}")
        if version is None:
            version = versions[-1]
        elif version not in versions:
            raise NotFound(f"{field}: adapter {name!r} has no version {version}")
        path = self._inside(self._name_dir(tenant, name) / str(version), field)
        metadata = json.loads((path / METADATA_FILE).read_text())
        return AdapterVersion(tenant, name, version, path, metadata)

    def list(self, tenant: str) -> list[AdapterVersion]:
        tenant_dir = self.root / tenant
        if not tenant_dir.is_dir():
            return []
        found = []
        for name_dir in sorted(tenant_dir.iterdir()):
            if RESOURCE_NAME.matches(name_dir.name):
                for version in self.versions(tenant, name_dir.name):
                    try:
                        found.append(self.get(tenant, f"{name_dir.name}/{version}"))
                    except InvalidArgument:
                        # A folder that resolves outside the registry (a planted symlink) is never served; one
                        # such entry must not make the tenant's whole listing fail.
                        log.warning("skipping %s/%s/%d: it resolves outside the adapter registry",
                                    tenant, name_dir.name, version)
        return found

    @contextmanager
    def _lock(self, tenant: str) -> Iterator[None]:
        (self.root / tenant).mkdir(parents=True, exist_ok=True)
        with open(self.root / tenant / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _last_version(self, tenant: str, name: str) -> int:
        try:
            return int((self._name_dir(tenant, name) / _LAST_VERSION).read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def _mark_last_version(self, tenant: str, name: str, version: int) -> None:
        folder = self._name_dir(tenant, name)
        folder.mkdir(parents=True, exist_ok=True)
        staged = folder / f"{_LAST_VERSION}.{os.getpid()}"
        staged.write_text(str(version))
        os.replace(staged, folder / _LAST_VERSION)

    def publish(self, tenant: str, name: str, source: Path, metadata: dict[str, Any], *,
                counter: VersionCounter | None = None) -> AdapterVersion:
        """Copies an adapter folder in as a new version of `name`, atomically. The number comes from
        `counter` (the control plane: unique across replicas) when given; without one (tools and
        tests with no database) from the registry's own mark. Either way it is above every number
        handed out before, deleted versions' included."""
        validate_name(name, "adapter_name")
        staging_root = self.root / _STAGING
        staging_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=staging_root))
        try:
            shutil.copytree(source, staging, dirs_exist_ok=True)
            digest = content_digest(staging)
            with self._lock(tenant):
                floor = max([*self.versions(tenant, name), self._last_version(tenant, name), 0])
                version = counter.next(tenant, name, floor) if counter is not None else floor + 1
                self._mark_last_version(tenant, name, version)
                final = self._name_dir(tenant, name) / str(version)
                meta = {**metadata, "tenant": tenant, "name": name, "version": version, CONTENT_DIGEST: digest}
                (staging / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
                final.parent.mkdir(parents=True, exist_ok=True)
                os.rename(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.get(tenant, f"{name}/{version}")

    def delete(self, tenant: str, name: str, version: int | None = None) -> int:
        """Deletes one version, or every version when version is None; returns how many."""
        with self._lock(tenant):
            versions = self.versions(tenant, name)
            doomed = versions if version is None else [v for v in versions if v == version]
            if not doomed:
                raise NotFound(f"no adapter {name!r}" + ("" if version is None else f" version {version}"))
            for v in doomed:
                target = self._name_dir(tenant, name) / str(v)
                # Rename first so readers never see a partly deleted version.
                trash = self.root / _STAGING / f"deleted-{tenant}-{name}-{v}-{os.getpid()}"
                os.rename(target, trash)
                shutil.rmtree(trash, ignore_errors=True)
        return len(doomed)
