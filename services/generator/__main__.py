"""`python -m services.generator`: runs the generator until SIGTERM (re-executed once with tcmalloc and
Intel OpenMP preloaded when they are installed and `preload_libraries` is on)."""

import os
import sys

from ragtune.server import run_service
from services.generator.preload import PRELOADED_MARKER, preload_value
from services.generator.server import GeneratorService
from services.generator.settings import GeneratorSettings

if __name__ == "__main__":
    settings = GeneratorSettings.from_environment()
    if settings.preload_libraries and not os.environ.get(PRELOADED_MARKER):
        preload = preload_value(os.environ.get("LD_PRELOAD", ""))
        if preload:
            # LD_PRELOAD only works from process start; exec keeps the pid, so signals and supervisors are unaffected.
            env = {**os.environ, PRELOADED_MARKER: "1", "LD_PRELOAD": preload}
            os.execve(sys.executable, [sys.executable, "-m", "services.generator", *sys.argv[1:]], env)
    run_service(GeneratorService, settings, name="generator")
