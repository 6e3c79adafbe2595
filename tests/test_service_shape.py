"""The shape every service shares, checked by reading the imports: servicer -> core -> backends, with
protobuf only at the servicer's edge; the shared package imports no service or client; no import circles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ragtune", "gateway", "services", "clients")
SERVICES = ("retriever", "generator", "trainer")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "v1" in path.relative_to(ROOT).parts[:2] and path.parts[-2] == "v1":
                continue  # generated stubs
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the nodes under `if TYPE_CHECKING:`: annotations, not imports at run time."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return skipped


def _imports(path: Path) -> set[str]:
    """Every module this file imports, at the top or inside functions (a lazy import is still an arrow)."""
    names: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    skipped = _type_checking_only(tree)
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _internal(names: set[str]) -> set[str]:
    return {n for n in names if n in MODULES}


GRAPH = {name: _internal(_imports(path)) - {name} for name, path in MODULES.items()}


def _closure(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        current = todo.pop()
        for nxt in GRAPH.get(current, ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _speaks_protobuf(module: str) -> bool:
    return any(n.endswith("_pb2") or n.endswith("_pb2_grpc") or n == "grpc" or n.startswith("grpc.")
               for n in _imports(MODULES[module]))


@pytest.mark.parametrize("service", SERVICES)
def test_each_service_has_a_servicer_a_core_and_backends_behind_it(service):
    folder = ROOT / "services" / service
    assert (folder / "server.py").is_file() and (folder / "core.py").is_file()
    core = f"services.{service}.core"
    below = {core} | {m for m in _closure(core) if m.startswith(f"services.{service}.")}
    speaking = sorted(m for m in below if _speaks_protobuf(m))
    assert not speaking, f"below the {service} servicer, these import protobuf or grpc: {speaking}"
    assert f"services.{service}.server" not in _closure(core)


def test_no_service_imports_another():
    owners = ("gateway", *(f"services.{s}" for s in SERVICES))
    for name in MODULES:
        mine = next((o for o in owners if name == o or name.startswith(o + ".")), None)
        if mine is None:
            continue
        foreign = {m for m in GRAPH[name] for o in owners if o != mine and (m == o or m.startswith(o + "."))}
        assert not foreign, f"{name} imports {sorted(foreign)}"


def test_the_shared_package_imports_no_service_and_no_client():
    for name in MODULES:
        if name == "ragtune" or name.startswith("ragtune."):
            outside = {m for m in GRAPH[name] if not (m == "ragtune" or m.startswith("ragtune."))}
            assert not outside, f"{name} imports {sorted(outside)}"


def test_there_are_no_import_circles():
    circles = []
    for start in MODULES:
        if start in _closure(start):
            circles.append(start)
    assert not circles, f"modules that import themselves through others: {sorted(circles)}"
