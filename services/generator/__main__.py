"""`python -m services.generator`: runs the generator until SIGTERM."""

from ragtune.server import run_service
from services.generator.server import GeneratorService
from services.generator.settings import GeneratorSettings

if __name__ == "__main__":
    run_service(GeneratorService, GeneratorSettings(), name="generator")
