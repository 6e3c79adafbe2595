"""The control plane: the records every replica must see (jobs and their events, dataset records,
evaluations with their per-question results, API keys), in one SQLAlchemy schema on SQLite by
default or PostgreSQL in clusters, migrated by Alembic.

Stores here take and return plain dataclasses; nothing below this package knows about gRPC.
"""

from ragtune.controlplane.database import Database, DatabaseUnavailable

__all__ = ["Database", "DatabaseUnavailable"]
