"""Retriever settings (environment variables prefixed RAGTUNE_RETRIEVER_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from ragtune.settings import ServiceSettings


class RetrieverSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RAGTUNE_RETRIEVER_", extra="ignore", frozen=True)

    port: int = Field(50052, ge=0, le=65535)
