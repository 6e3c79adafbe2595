"""Gateway settings (environment variables prefixed RAGTUNE_GATEWAY_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from ragtune.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RAGTUNE_GATEWAY_", extra="ignore", frozen=True)

    port: int = Field(50051, ge=0, le=65535)
