"""Alembic environment: runs on the connection `Database.migrate` opened (and locked)."""

from alembic import context

from ragtune.controlplane.schema import metadata

connection = context.config.attributes["connection"]
# render_as_batch: SQLite alters tables by copying them; the same migration then runs on both backends.
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
