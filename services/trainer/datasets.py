"""Uploaded JSONL datasets per tenant: files under the artifact root (shared storage), written
atomically, and a record of each in the control-plane database, so every replica sees every upload."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ragtune.naming import DATASET_NAME
from ragtune.controlplane.datasets import DatasetRecords
from ragtune.errors import InvalidArgument, NotFound, ResourceExhausted



@dataclass(frozen=True)
class DatasetInfo:
    name: str
    path: Path
    size_bytes: int
    sha256: str
    lines: int


def validate_dataset_name(name: str, field: str = "name") -> str:
    return DATASET_NAME.check(name, field)


def file_digest(path: Path) -> tuple[str, int]:
    digest, lines = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            lines += block.count(b"\n")
    return digest.hexdigest(), lines


class DatasetUpload:
    """One upload in progress: bytes go to a staging file that becomes the dataset only on commit."""

    def __init__(self, store: DatasetStore, tenant: str, name: str):
        self._store, self._tenant, self.name = store, tenant, name
        store.staging.mkdir(parents=True, exist_ok=True)
        handle, path = tempfile.mkstemp(dir=store.staging, prefix="upload-")
        self._file = os.fdopen(handle, "wb")
        self._path = Path(path)
        self._digest = hashlib.sha256()
        self.size = 0
        self.lines = 0
        self._last = b"\n"

    def check_name(self, name: str) -> None:
        """Every later message of the stream repeats the first one's name or leaves it empty."""
        if name and name != self.name:
            raise InvalidArgument("name", "must be the same in every message of the stream, or empty")

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self._store.max_bytes:
            raise ResourceExhausted(f"dataset larger than the {self._store.max_bytes} bytes this trainer accepts")
        self._file.write(chunk)
        self._digest.update(chunk)
        self.lines += chunk.count(b"\n")
        if chunk:
            self._last = chunk[-1:]

    def commit(self) -> DatasetInfo:
        """Moves the file into place, then records it: a record never names a half-written file."""
        self._file.close()
        target = self._store.path(self._tenant, self.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._path, target)
        lines = self.lines + (0 if self._last == b"\n" else 1)
        info = DatasetInfo(self.name, target, self.size, self._digest.hexdigest(), lines)
        self._store.record(self._tenant, info)
        return info

    def abort(self) -> None:
        self._file.close()
        self._path.unlink(missing_ok=True)


class DatasetStore:
    """Datasets as files `<root>/<tenant>/<name>` (an upload replaces one atomically), found through
    their records, whose paths are relative to the artifact root that every replica mounts."""

    def __init__(self, root: Path, artifacts: Path, max_bytes: int, records: DatasetRecords):
        self.root = Path(root)
        self.artifacts = Path(artifacts)
        self.staging = self.root / ".staging"
        self.max_bytes = max_bytes
        self.records = records

    def path(self, tenant: str, name: str, field: str = "name") -> Path:
        return self.root / tenant / validate_dataset_name(name, field)

    def upload(self, tenant: str, name: str) -> DatasetUpload:
        validate_dataset_name(name)
        return DatasetUpload(self, tenant, name)

    def record(self, tenant: str, info: DatasetInfo) -> None:
        try:
            stored = str(info.path.relative_to(self.artifacts))
        except ValueError:
            stored = str(info.path)  # a data_dir outside the artifact root: keep it absolute
        self.records.put(tenant, info.name, stored, info.size_bytes, info.sha256, info.lines)

    def get(self, tenant: str, name: str, field: str = "dataset") -> Path:
        validate_dataset_name(name, field)
        record = self.records.get(tenant, name)
        path = self.artifacts / record.path if record else None
        if path is None or not path.is_file():
            raise NotFound(f"{field}: no dataset named {name!r}; upload it with UploadDataset")
        return path
