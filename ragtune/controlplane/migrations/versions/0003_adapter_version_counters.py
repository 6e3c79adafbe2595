"""A counter per adapter of the last version number handed out, so a deleted version's number is
never published again (additive: one new table).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "adapter_version_counters",
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("adapter", sa.String(length=64), nullable=False),
        sa.Column("last_version", sa.Integer(), nullable=False),
        sa.Column("update_time", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("tenant", "adapter", name=op.f("pk_adapter_version_counters")),
    )


def downgrade() -> None:
    op.drop_table("adapter_version_counters")
