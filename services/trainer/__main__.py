"""`python -m services.trainer`: runs the trainer until SIGTERM."""

from ragtune.server import run_service
from services.trainer.server import TrainerService
from services.trainer.settings import TrainerSettings

if __name__ == "__main__":
    run_service(TrainerService, TrainerSettings.from_environment(), name="trainer")
