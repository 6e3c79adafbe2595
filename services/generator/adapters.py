"""The adapters the generator serves: resolved only through the adapter registry, checked, given stable
LoRA ids, and loaded into / removed from the engine with reference counts so that unloading an adapter
never breaks the requests still using it."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field

from ragtune.errors import FailedPrecondition, InvalidArgument, NotFound
from ragtune.registry import AdapterRegistry, AdapterVersion, parse_adapter_ref
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
    weights_mtime_ns: int
    users: int = 0  # requests running with it
    listed: bool = True  # False once unloaded; removed from the engine when the last user leaves

    @property
    def ref(self) -> str:
        return f"{self.version.name}/{self.version.version}"


@dataclass
class _Ids:
    next_id: int = 1
    by_key: dict[tuple[str, int], int] = field(default_factory=dict)

    def of(self, registry_path: str, weights_mtime_ns: int) -> int:
        # Same folder and same weights keep their id; a republished folder gets a new one, so the
        # engine never serves stale weights cached under an old id.
        key = (registry_path, weights_mtime_ns)
        if key not in self.by_key:
            self.by_key[key] = self.next_id
            self.next_id += 1
        return self.by_key[key]


class AdapterCatalog:
    def __init__(self, registry: AdapterRegistry, engine: GenerationEngine, *, base_model: str, max_lora_rank: int):
        self._registry = registry
        self._engine = engine
        self._base_model = base_model
        self._max_rank = max_lora_rank
        self._entries: dict[str, CatalogEntry] = {}  # by registry path "<tenant>/<name>/<version>"
        self._ids = _Ids()
        self._lock = asyncio.Lock()

    def inspect(self, version: AdapterVersion, field_name: str) -> tuple[int, int]:
        """Checks an adapter folder before the engine may read it; returns (rank, weights mtime).
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
        return rank, (version.path / WEIGHTS_FILE).stat().st_mtime_ns

    async def _resolve(self, tenant: str, ref: str, field_name: str) -> CatalogEntry:
        version = await asyncio.to_thread(self._registry.get, tenant, ref, field_name)
        entry = self._entries.get(version.registry_path)
        if entry is not None:
            return entry
        async with self._lock:
            entry = self._entries.get(version.registry_path)
            if entry is not None:
                return entry
            rank, mtime = await asyncio.to_thread(self.inspect, version, field_name)
            handle = LoraHandle(self._ids.of(version.registry_path, mtime), version.registry_path, version.path)
            try:
                await self._engine.add_lora(handle)
            except Exception as exc:  # noqa: BLE001 - a malformed adapter is the caller's problem, not a crash
                log.warning("engine refused adapter %s: %s", version.registry_path, exc)
                raise FailedPrecondition(
                    f"{field_name}: adapter {version.registry_path} could not be loaded: {exc}"
                ) from exc
            entry = CatalogEntry(version, handle, rank, mtime)
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
            if entry.listed or entry.users > 0 or self._entries.get(entry.version.registry_path) is not entry:
                return
            del self._entries[entry.version.registry_path]
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
