"""The tenant a call acts for, carried in request metadata from the gateway to the services."""

from __future__ import annotations

import re

import grpc

from ragtune.errors import Unauthenticated

TENANT_METADATA_KEY = "x-ragtune-tenant"
INTERNAL_TOKEN_METADATA_KEY = "x-ragtune-internal-token"
# The API key id the gateway authenticated, recorded by audit trails (alias moves).
ACTOR_METADATA_KEY = "x-ragtune-actor"
_TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def is_valid_tenant(tenant: str) -> bool:
    return bool(_TENANT_RE.match(tenant))


def tenant_of(context: grpc.aio.ServicerContext) -> str:
    """The tenant named in the call's metadata; UNAUTHENTICATED when it is missing or malformed."""
    values = [v for k, v in (context.invocation_metadata() or ()) if k == TENANT_METADATA_KEY]
    if not values:
        raise Unauthenticated(f"missing tenant: the '{TENANT_METADATA_KEY}' metadata is required")
    tenant = values[0]
    if len(values) > 1 or not is_valid_tenant(tenant):
        raise Unauthenticated(
            f"invalid tenant in '{TENANT_METADATA_KEY}': one value of lowercase letters, digits, '_' or '-'"
        )
    return tenant


def actor_of(context: grpc.aio.ServicerContext) -> str:
    """Who made the call, for audit trails: the API key id the gateway passes, else the tenant."""
    md = dict(context.invocation_metadata() or ())
    return str(md.get(ACTOR_METADATA_KEY) or f"tenant:{md.get(TENANT_METADATA_KEY, '')}")[:128]


def tenant_metadata(tenant: str, internal_token: str | None = None, actor: str = "") -> tuple[tuple[str, str], ...]:
    """Metadata the gateway (and tests) attach to downstream calls."""
    md = [(TENANT_METADATA_KEY, tenant)]
    if actor:
        md.append((ACTOR_METADATA_KEY, actor))
    if internal_token:
        md.append((INTERNAL_TOKEN_METADATA_KEY, internal_token))
    return tuple(md)
