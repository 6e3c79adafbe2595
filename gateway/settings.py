"""Gateway settings (environment variables prefixed RAGTUNE_GATEWAY_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from ragtune.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RAGTUNE_GATEWAY_", extra="ignore", frozen=True)

    port: int = Field(50051, ge=0, le=65535)
    retriever_address: str = Field("127.0.0.1:50052", description="host:port of the retriever.")
    generator_address: str = Field("127.0.0.1:50053", description="host:port of the generator.")
    trainer_address: str = Field("127.0.0.1:50054", description="host:port of the trainer.")
    api_keys_file: Path | None = Field(
        None, description="JSON file of hashed API keys: {\"keys\": [{\"sha256\", \"tenant\", \"scopes\"}]}."
    )
    api_keys: SecretStr | None = Field(None, description="The same JSON as api_keys_file, inline (e.g. from a Secret).")
    default_timeout_s: float = Field(120.0, gt=0, description="Deadline for downstream calls when the client sets none.")
    retry_attempts: int = Field(3, ge=1, le=10, description="Attempts for idempotent reads on UNAVAILABLE.")
    retry_backoff_s: float = Field(0.1, ge=0, description="First backoff between attempts; doubles each time.")
    default_top_k: int = Field(4, ge=1, le=20, description="Chunks retrieved for Ask when top_k is 0.")
    max_top_k: int = Field(20, ge=1, le=100, description="Largest top_k Ask accepts.")
    default_max_tokens: int = Field(256, ge=1, description="Answer length when sampling.max_tokens is unset.")
    key_refresh_s: float = Field(
        2.0, gt=0, le=300, description="How often each replica reloads API keys from the database: a revoked key is"
        " refused by every replica at most this long after RevokeApiKey."
    )
    evaluation_workers: int = Field(
        1, ge=0, le=16, description="Evaluations this replica runs at once (claimed from the database); 0 serves the"
        " evaluation RPCs but runs none."
    )
    evaluation_lease_s: float = Field(
        30.0, ge=1, description="A replica's claim on a running evaluation lasts this long unless renewed; when it dies,"
        " another replica resumes the evaluation at most this long later."
    )
    poll_interval_s: float = Field(
        0.5, gt=0, le=60, description="How often idle evaluation workers look for work and watchers for changes."
    )
    tokenizer_dir: Path | None = Field(
        None, description="Tokenizer used to fit context into the window; default the prepared base model."
    )
