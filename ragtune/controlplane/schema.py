"""The control-plane tables. Alembic's migrations (./migrations) create them; this module is the
model the stores query through. Times are UNIX seconds (floats) written by the replicas."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

# Deterministic constraint names, so later migrations can refer to them on every backend.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


def _lease_columns() -> list[Column]:
    """Columns of work that a worker claims: who holds it, until when, how many claims so far."""
    return [
        Column("worker_id", String(128), nullable=True),
        Column("lease_expires", Float, nullable=False, default=0.0),
        Column("attempts", Integer, nullable=False, default=0),
        Column("cancel_requested", Boolean, nullable=False, default=False),
    ]


jobs = Table(
    "jobs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant", String(64), nullable=False),
    # NULL when the client sent none: the unique constraint then never applies.
    Column("client_request_id", String(128), nullable=True),
    Column("spec", JSON, nullable=False),
    Column("state", String(16), nullable=False),
    Column("error", Text, nullable=False, default=""),
    Column("problems", JSON, nullable=False, default=list),
    Column("step", Integer, nullable=False, default=0),
    Column("total_steps", Integer, nullable=False, default=0),
    Column("metrics", JSON, nullable=True),
    Column("adapter_path", String(512), nullable=False, default=""),
    Column("last_sequence", Integer, nullable=False, default=0),
    *_lease_columns(),
    Column("create_time", Float, nullable=False),
    Column("update_time", Float, nullable=False),
    UniqueConstraint("tenant", "client_request_id", name="uq_jobs_tenant_request"),
    Index("ix_jobs_tenant_created", "tenant", "create_time"),
    Index("ix_jobs_state_created", "state", "create_time"),
)

# Workers claim the oldest unfinished row: a partial index keeps that one index step however many
# finished rows pile up (measured: without it PostgreSQL sorted the whole table, 33 ms at 50k jobs).
_UNFINISHED_JOBS = jobs.c.state.in_(["QUEUED", "VALIDATING", "RUNNING"])
Index("ix_jobs_claimable", jobs.c.create_time, jobs.c.id, postgresql_where=_UNFINISHED_JOBS,
      sqlite_where=_UNFINISHED_JOBS)

job_events = Table(
    "job_events",
    metadata,
    Column("job_id", String(64), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("sequence", Integer, primary_key=True),
    Column("time", Float, nullable=False),
    Column("state", String(16), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("payload", JSON, nullable=False),
)

datasets = Table(
    "datasets",
    metadata,
    Column("tenant", String(64), primary_key=True),
    Column("name", String(128), primary_key=True),
    Column("path", String(1024), nullable=False),  # relative to the artifact root
    Column("size_bytes", Integer, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("lines", Integer, nullable=False),
    Column("update_time", Float, nullable=False),
)

evaluations = Table(
    "evaluations",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("spec", LargeBinary, nullable=False),  # the request as the API received it (serialized)
    Column("snapshot", JSON, nullable=False),  # what Get/Watch answer: progress, summaries, verdict
    Column("revision", Integer, nullable=False, default=1),  # bumped on every change; watchers poll it
    Column("error", Text, nullable=False, default=""),
    Column("knowledge_update", JSON, nullable=True),  # its result, once measured
    Column("report_path", String(1024), nullable=False, default=""),  # relative to the artifact root
    Column("last_sequence", Integer, nullable=False, default=0),
    *_lease_columns(),
    Column("create_time", Float, nullable=False),
    Column("update_time", Float, nullable=False),
    Index("ix_evaluations_tenant_created", "tenant", "create_time"),
    Index("ix_evaluations_state_created", "state", "create_time"),
)

_UNFINISHED_EVALUATIONS = evaluations.c.state.in_(["QUEUED", "RUNNING"])
Index("ix_evaluations_claimable", evaluations.c.create_time, evaluations.c.id,
      postgresql_where=_UNFINISHED_EVALUATIONS, sqlite_where=_UNFINISHED_EVALUATIONS)

evaluation_results = Table(
    "evaluation_results",
    metadata,
    Column("evaluation_id", String(64), ForeignKey("evaluations.id", ondelete="CASCADE"), primary_key=True),
    Column("arm", String(32), primary_key=True),
    Column("item_index", Integer, primary_key=True),
    Column("result", JSON, nullable=False),
    Column("worker_id", String(128), nullable=False),
    Column("time", Float, nullable=False),
)

evaluation_events = Table(
    "evaluation_events",
    metadata,
    Column("evaluation_id", String(64), ForeignKey("evaluations.id", ondelete="CASCADE"), primary_key=True),
    Column("sequence", Integer, primary_key=True),
    Column("time", Float, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("payload", JSON, nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("sha256", String(64), nullable=False, unique=True),
    Column("tenant", String(64), nullable=False),
    Column("scopes", JSON, nullable=False),
    Column("name", String(128), nullable=False, default=""),
    Column("prefix", String(16), nullable=False, default=""),  # the key's first characters, to recognise it
    Column("source", String(32), nullable=False, default="api"),  # api | file (bootstrap import)
    Column("create_time", Float, nullable=False),
    Column("revoke_time", Float, nullable=True),
    Index("ix_api_keys_tenant", "tenant"),
)

adapter_aliases = Table(
    "adapter_aliases",
    metadata,
    Column("tenant", String(64), primary_key=True),
    Column("adapter", String(64), primary_key=True),
    Column("alias", String(64), primary_key=True),
    # [{"version": 3, "weight": 90}, {"version": 4, "weight": 10}]: one target, or a canary split.
    Column("targets", JSON, nullable=False),
    Column("revision", Integer, nullable=False, default=1),
    Column("update_time", Float, nullable=False),
)

# The audit trail: who moved which alias when, from what to what, and why.
adapter_alias_events = Table(
    "adapter_alias_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("tenant", String(64), nullable=False),
    Column("adapter", String(64), nullable=False),
    Column("alias", String(64), nullable=False),
    Column("time", Float, nullable=False),
    Column("action", String(16), nullable=False),  # set | promote | rollback | delete
    Column("actor", String(128), nullable=False),
    Column("reason", Text, nullable=False, default=""),
    Column("from_targets", JSON, nullable=True),
    Column("to_targets", JSON, nullable=True),
    Index("ix_adapter_alias_events_alias", "tenant", "adapter", "alias", "id"),
)

# The last version number handed out per adapter: a version is never handed out twice, even after
# the newest one is deleted, so a (tenant, name, version) always names the same weights.
adapter_version_counters = Table(
    "adapter_version_counters",
    metadata,
    Column("tenant", String(64), primary_key=True),
    Column("adapter", String(64), primary_key=True),
    Column("last_version", Integer, nullable=False),
    Column("update_time", Float, nullable=False),
)

# Quota limits (ragtune/controlplane/quotas.py): one row per tenant (key_id "") and per API key that overrides
# it; a NULL limit means the default (the tenant's for a key, the gateway's settings for a tenant).
quotas = Table(
    "quotas",
    metadata,
    Column("tenant", String(64), primary_key=True),
    Column("key_id", String(64), primary_key=True),
    Column("requests_per_s", Float, nullable=True),
    Column("generated_tokens_per_min", BigInteger, nullable=True),
    Column("concurrent_streams", Integer, nullable=True),
    Column("queued_jobs", Integer, nullable=True),
    Column("running_evaluations", Integer, nullable=True),
    Column("stored_bytes", BigInteger, nullable=True),
    Column("update_time", Float, nullable=False),
    Column("updated_by", String(128), nullable=False, default=""),
)
