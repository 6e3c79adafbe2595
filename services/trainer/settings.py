"""Trainer settings (environment variables prefixed RAGTUNE_TRAINER_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from ragtune.settings import ServiceSettings


class TrainerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RAGTUNE_TRAINER_", extra="ignore", frozen=True)

    port: int = Field(50054, ge=0, le=65535)
