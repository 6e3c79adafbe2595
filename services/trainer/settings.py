"""Trainer settings (environment variables prefixed RAGTUNE_TRAINER_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from ragtune.settings import ServiceSettings


class TrainerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RAGTUNE_TRAINER_", extra="ignore", frozen=True)

    port: int = Field(50054, ge=0, le=65535)
    data_dir: Path | None = Field(
        None, description="Where datasets, the job database and checkpoints live; default <RAGTUNE_HOME>/trainer."
    )
    max_dataset_bytes: int = Field(64 * 1024 * 1024, ge=1, description="Largest dataset UploadDataset accepts.")
    min_examples: int = Field(8, ge=1, description="Fewest valid training examples a dataset must hold.")
    max_queued_jobs: int = Field(100, ge=1, description="Jobs waiting beyond this make CreateJob RESOURCE_EXHAUSTED.")
    concurrent_jobs: int = Field(1, ge=1, description="Jobs trained at the same time (each takes the CPU cores).")
    torch_threads: int = Field(2, ge=1, description="torch intra-op threads for training.")
    default_checkpoint_every_steps: int = Field(50, ge=1, description="Checkpoint interval when a job sets none.")

    @property
    def trainer_dir(self) -> Path:
        return self.data_dir or self.home / "trainer"
