"""Generator settings (environment variables prefixed RAGTUNE_GENERATOR_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from ragtune.settings import ServiceSettings


class GeneratorSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RAGTUNE_GENERATOR_", extra="ignore", frozen=True)

    port: int = Field(50053, ge=0, le=65535)
