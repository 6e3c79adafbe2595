"""Settings read from environment variables, with documented defaults, for every service.

Each service subclasses `ServiceSettings` with its own prefix (RAGTUNE_RETRIEVER_ ...);
the fields here that every service shares read un-prefixed RAGTUNE_* variables.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_HOME = Path("~/.cache/ragtune").expanduser()
_SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|KEY|URL", re.IGNORECASE)


class ServiceSettings(BaseSettings):
    """What every ragtune server reads. Subclasses set env_prefix and a default port."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", description="Address to bind; 0.0.0.0 in containers.")
    port: int = Field(0, ge=0, le=65535, description="Port to bind; 0 picks a free one.")
    grace_period_s: float = Field(10.0, ge=0, description="How long in-flight calls may finish after SIGTERM.")
    home: Path = Field(
        DEFAULT_HOME,
        validation_alias="RAGTUNE_HOME",
        description="Root folder for the services' data (stores, jobs, adapter registry).",
    )
    model_cache: Path = Field(
        DEFAULT_HOME / "models",
        validation_alias="RAGTUNE_MODEL_CACHE",
        description="Where the base model prepared at setup lives.",
    )
    artifact_root: Path | None = Field(
        None,
        validation_alias="RAGTUNE_ARTIFACT_ROOT",
        description="Shared storage for datasets, checkpoints, adapters and evaluation reports (a"
        " ReadWriteMany volume in Kubernetes); default <RAGTUNE_HOME>.",
    )
    adapter_registry: Path | None = Field(
        None,
        validation_alias="RAGTUNE_ADAPTER_REGISTRY",
        description="Root of the adapter registry; default <RAGTUNE_ARTIFACT_ROOT>/adapters.",
    )
    database_url: str | None = Field(
        None,
        validation_alias="RAGTUNE_DATABASE_URL",
        description="SQLAlchemy URL of the control-plane database: sqlite:///path (default"
        " sqlite:///<RAGTUNE_HOME>/controlplane.sqlite3) or postgresql+psycopg://user@host:5432/db.",
    )
    database_password: SecretStr | None = Field(
        None,
        validation_alias="RAGTUNE_DATABASE_PASSWORD",
        description="Password for RAGTUNE_DATABASE_URL, kept out of the URL (e.g. from a Secret).",
    )
    database_migrate: bool = Field(
        True,
        validation_alias="RAGTUNE_DATABASE_MIGRATE",
        description="Upgrade the schema at start (under a lock, so replicas never race); false when a"
        " separate migration step (`python -m ragtune.controlplane migrate`) owns it.",
    )
    log_level: str = Field("INFO", validation_alias="RAGTUNE_LOG_LEVEL")
    log_format: Literal["json", "text"] = Field("json", validation_alias="RAGTUNE_LOG_FORMAT")
    internal_token: SecretStr | None = Field(
        None,
        validation_alias="RAGTUNE_INTERNAL_TOKEN",
        description="If set, internal services accept calls only with this token (the gateway sends it).",
    )

    @classmethod
    def from_environment(cls):
        """The settings from the environment; a bad value stops the process at start with exit status 2 and one
        line per mistake naming its variable (`python -m services.X` calls this before logging exists)."""
        try:
            return cls()
        except ValidationError as exc:
            for line in settings_errors(cls, exc):
                print(line, file=sys.stderr)
            raise SystemExit(2) from None

    @property
    def artifacts(self) -> Path:
        return self.artifact_root or self.home

    @property
    def registry_root(self) -> Path:
        return self.adapter_registry or self.artifacts / "adapters"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def settings_errors(cls, exc: ValidationError) -> list[str]:
    """`RAGTUNE_GENERATOR_BLOCK_SIZE='48': Input should be a multiple of 32` for each error, no traceback."""
    prefix = cls.model_config.get("env_prefix", "")
    lines = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        variable = field if field.startswith("RAGTUNE_") else f"{prefix}{field}".upper() if field else cls.__name__
        shown = field and isinstance(error.get("input"), str) and not _SECRET_NAME.search(variable)
        value = f"={error['input']!r}" if shown else ""  # never echo what may be a secret
        lines.append(f"{variable}{value}: {error['msg']}")
    return lines


class TLSSettings(BaseSettings):
    """TLS for this process's gRPC (and HTTP) server and for its outgoing gRPC calls (environment
    RAGTUNE_TLS_*; ragtune/tls.py turns them into credentials). All unset = plaintext, the default on
    one machine. Files are PEM, read when the server or channel starts, never logged."""

    model_config = SettingsConfigDict(env_prefix="RAGTUNE_TLS_", extra="ignore", frozen=True)

    cert_file: Path | None = Field(
        None, description="This server's certificate chain (PEM). With RAGTUNE_TLS_KEY_FILE: serve TLS only."
    )
    key_file: Path | None = Field(None, description="The private key of RAGTUNE_TLS_CERT_FILE (PEM).")
    client_ca_file: Path | None = Field(
        None,
        description="When set, the server requires every client to present a certificate signed by one of"
        " these CAs (mutual TLS); health and reflection included.",
    )
    ca_file: Path | None = Field(
        None,
        description="Roots trusted for this process's outgoing gRPC calls (gateway -> services, health"
        " checks); when set, those calls use TLS.",
    )
    client_cert_file: Path | None = Field(
        None, description="Certificate chain this process presents on its outgoing calls (mutual TLS)."
    )
    client_key_file: Path | None = Field(None, description="The private key of RAGTUNE_TLS_CLIENT_CERT_FILE.")
    server_name_override: str | None = Field(
        None,
        description="Name to verify in the servers' certificates instead of the host of the address (tests,"
        " or addresses that are not in the certificate).",
    )
