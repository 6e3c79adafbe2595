"""The adapters the generator serves: resolved only through the adapter registry, checked, given stable
LoRA ids, and loaded into / removed from the engine with reference counts so that unloading an adapter
never breaks the requests still using it. A version whose folder now holds other files than the ones
loaded (its content digest changed) is loaded again under a new id: stale weights are never served."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field

from ragtune.errors import FailedPrecondition, InvalidArgument, NotFound
from ragtune.registry import CONTENT_DIGEST, AdapterRegistry, AdapterVersion, parse_adapter_ref
from services.generator.engine import GenerationEngine, LoraHandle

log = logging.getLogger(__name__)

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
# Formats that unpickle on load and so can run code: never handed to the engine.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass
class CatalogEntry:
    version: AdapterVersion
    handle: LoraHandle
    rank: int
    content_id: str  # what the folder held when loaded (content_id_of)
    users: int = 0  # requests running with it
    listed: bool = True  # False once unloaded; removed from the engine when the last user leaves
    removed: bool = False  # gone from the engine

    @property
    def ref(self) -> str:
        return f"{self.version.name}/{self.version.version}"


@dataclass
class _Ids:
    next_id: int = 1
    by_key: dict[tuple[str, str], int] = field(default_factory=dict)

    def of(self, registry_path: str, content_id: str) -> int:
        # Same folder and same weights keep their id; a republished folder gets a new one, so the
        # engine never serves stale weights cached under an old id.
        key = (registry_path, content_id)
        if key not in self.by_key:
            self.by_key[key] = self.next_id
            self.next_id += 1
        return self.by_key[key]


def content_id_of(version: AdapterVersion) -> str:
    """What a version folder holds: the digest the registry recorded at publish time (absent for
    versions published before it did) and the weights file's modification time, so both a folder
    copied in under an old number and weights rewritten in place read as a change. One stat:
    blocking, call it off the event loop."""
    try:
        mtime = (version.path / WEIGHTS_FILE).stat().st_mtime_ns
    except FileNotFoundError:
        mtime = 0
    return f"{version.metadata.get(CONTENT_DIGEST) or '-'}:{mtime}"


class AdapterCatalog:
    def __init__(self, registry: AdapterRegistry, engine: GenerationEngine, *, base_model: str, max_lora_rank: int):
        self._registry = registry
        self._engine = engine
        self._base_model = base_model
        self._max_rank = max_lora_rank
        self._entries: dict[str, CatalogEntry] = {}  # by registry path "<tenant>/<name>/<version>"
        self._ids = _Ids()
        self._lock = asyncio.Lock()

    def inspect(self, version: AdapterVersion, field_name: str) -> tuple[int, str]:
        """Checks an adapter folder before the engine may read it; returns (rank, content id).
        Blocking (file reads): call it off the event loop."""
        root = self._registry.root.resolve()
        for path in sorted(version.path.rglob("*")):
            real = path.resolve()
            if real != root and root not in real.parents:
                raise InvalidArgument(
                    field_name, f"{path.name} in adapter {version.registry_path} links outside the registry"
                )
            if path.suffix.lower() in PICKLE_SUFFIXES:
                raise InvalidArgument(
                    field_name,
                    f"adapter {version.registry_path} holds {path.name}: "
                    "only safetensors weights are accepted (no pickle)",
                )
        if not (version.path / WEIGHTS_FILE).is_file() or not (version.path / CONFIG_FILE).is_file():
            raise InvalidArgument(field_name, f"adapter {version.registry_path} lacks {CONFIG_FILE} or {WEIGHTS_FILE}")
        base = version.metadata.get("base_model")
        if base != self._base_model:
            raise InvalidArgument(
                field_name,
                f"adapter {version.registry_path} was trained on base model {base!r}; "
                f"this generator serves {self._base_model!r}",
            )
        if version.metadata.get("servable") is False:
            raise InvalidArgument(
                field_name,
                f"adapter {version.registry_path} ({version.metadata.get('method')}) is not servable per request",
            )
        config = json.loads((version.path / CONFIG_FILE).read_text())
        if str(config.get("peft_type", "LORA")).upper() != "LORA":
            raise InvalidArgument(
                field_name,
                f"adapter {version.registry_path} is {config.get('peft_type')}; only LoRA adapters are served",
            )
        ranks = [int(config.get("r", 0)), *(int(r) for r in (config.get("rank_pattern") or {}).values())]
        rank = max(ranks)
        if rank > self._max_rank:
            raise InvalidArgument(
                field_name, f"adapter {version.registry_path} has rank {rank}, above max_lora_rank {self._max_rank}"
            )
        return rank, content_id_of(version)

    def _read(self, tenant: str, ref: str, field_name: str) -> tuple[AdapterVersion, str]:
        version = self._registry.get(tenant, ref, field_name)
        return version, content_id_of(version)

    def _current(self, version: AdapterVersion, content: str) -> CatalogEntry | None:
        """The loaded entry for this version if it still holds what the folder holds now."""
        entry = self._entries.get(version.registry_path)
        return entry if entry is not None and entry.content_id == content else None

    async def _resolve(self, tenant: str, ref: str, field_name: str) -> CatalogEntry:
        version, content = await asyncio.to_thread(self._read, tenant, ref, field_name)
        entry = self._current(version, content)
        if entry is not None:
            return entry
        async with self._lock:
            entry = self._current(version, content)
            if entry is not None:
                return entry
            stale = self._entries.pop(version.registry_path, None)
            if stale is not None:
                # The folder was replaced (deleted and published again by hand, or restored from a
                # backup): requests from now on get the new weights; the old ones leave the engine
                # once the requests still using them end.
                log.warning("adapter %s changed on disk since it was loaded; loading it again",
                            version.registry_path)
                stale.listed = False
                # Its id stays with it until it leaves the engine: the same files again later get a new one.
                self._ids.by_key.pop((version.registry_path, stale.content_id), None)
                if stale.users == 0:
                    await self._remove_from_engine(stale)
            rank, _ = await asyncio.to_thread(self.inspect, version, field_name)
            handle = LoraHandle(self._ids.of(version.registry_path, content), version.registry_path, version.path)
            try:
                await self._engine.add_lora(handle)
            except Exception as exc:  # noqa: BLE001 - a malformed adapter is the caller's problem, not a crash
                log.warning("engine refused adapter %s: %s", version.registry_path, exc)
                raise FailedPrecondition(
                    f"{field_name}: adapter {version.registry_path} could not be loaded: {exc}"
                ) from exc
            entry = CatalogEntry(version, handle, rank, content)
            self._entries[version.registry_path] = entry
            log.info("loaded adapter %s as LoRA id %d", version.registry_path, handle.lora_id)
            return entry

    async def load(self, tenant: str, ref: str, field_name: str = "name") -> CatalogEntry:
        """Loads (or re-lists) an adapter so requests can name it."""
        entry = await self._resolve(tenant, ref, field_name)
        entry.listed = True
        return entry

    async def acquire(self, tenant: str, ref: str, field_name: str = "adapter") -> CatalogEntry:
        """The adapter for one request, loaded on demand; pair with release()."""
        entry = await self.load(tenant, ref, field_name)
        entry.users += 1
        return entry

    async def release(self, entry: CatalogEntry) -> None:
        entry.users -= 1
        await self._remove_if_unused(entry)

    async def unload(self, tenant: str, ref: str, field_name: str = "name") -> list[CatalogEntry]:
        """Unlists the tenant's loaded versions matching "<name>" or "<name>/<version>"; each leaves the
        engine once no request uses it."""
        name, version = parse_adapter_ref(ref, field_name)
        doomed = [
            e
            for e in self._entries.values()
            if e.listed
            and e.version.tenant == tenant
            and e.version.name == name
            and version in (None, e.version.version)
        ]
        if not doomed:
            raise NotFound(f"{field_name}: no loaded adapter {ref!r}")
        for entry in doomed:
            entry.listed = False
            await self._remove_if_unused(entry)
        return doomed

    async def _remove_if_unused(self, entry: CatalogEntry) -> None:
        async with self._lock:
            if entry.listed or entry.users > 0 or entry.removed:
                return
            if self._entries.get(entry.version.registry_path) is entry:
                del self._entries[entry.version.registry_path]
            await self._remove_from_engine(entry)

    async def _remove_from_engine(self, entry: CatalogEntry) -> None:
        """Under self._lock."""
        entry.removed = True
        try:
            await self._engine.remove_lora(entry.handle.lora_id)
        except Exception:  # noqa: BLE001 - runs as a request finishes: that request succeeded regardless
            log.exception("engine failed to remove adapter %s", entry.version.registry_path)
            return
        log.info("unloaded adapter %s", entry.version.registry_path)

    def loaded(self, tenant: str) -> list[CatalogEntry]:
        return sorted(
            (e for e in self._entries.values() if e.listed and e.version.tenant == tenant),
            key=lambda e: e.version.registry_path,
        )
