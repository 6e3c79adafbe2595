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
        None, description="Where datasets and job checkpoints live; default <RAGTUNE_ARTIFACT_ROOT>/trainer (shared"
        " storage, so another replica resumes a job from its checkpoint)."
    )
    max_dataset_bytes: int = Field(64 * 1024 * 1024, ge=1, description="Largest dataset UploadDataset accepts.")
    min_examples: int = Field(8, ge=1, description="Fewest valid training examples a dataset must hold.")
    max_queued_jobs: int = Field(100, ge=1, description="Jobs waiting beyond this make CreateJob RESOURCE_EXHAUSTED.")
    concurrent_jobs: int = Field(1, ge=1, description="Jobs trained at the same time (each takes the CPU cores).")
    torch_threads: int = Field(2, ge=1, description="torch intra-op threads for training.")
    default_checkpoint_every_steps: int = Field(50, ge=1, description="Checkpoint interval when a job sets none.")
    lease_s: float = Field(
        30.0, ge=1, description="A worker's claim on a running job lasts this long unless renewed (every third of it);"
        " when a worker dies, another resumes the job from its checkpoint at most this long later. A CancelJob"
        " sent to another replica reaches the running job within a third of it."
    )
    poll_interval_s: float = Field(
        1.0, gt=0, le=60, description="How often idle workers look for queued jobs and WatchJob streams for new"
        " events: an event recorded on another replica reaches a watcher at most this long after it (one"
        " recorded on the same replica, at once)."
    )
    worker_id: str | None = Field(
        None, description="Name of this worker in job records; default <hostname>-<pid>. With several"
        " concurrent jobs, each worker thread is <worker_id>/<n>."
    )

    @property
    def trainer_dir(self) -> Path:
        return self.data_dir or self.artifacts / "trainer"
