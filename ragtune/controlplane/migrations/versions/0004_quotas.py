"""Quota limits per tenant and per API key (additive: a new table; no row means the defaults).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "quotas",
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("requests_per_s", sa.Float(), nullable=True),
        sa.Column("generated_tokens_per_min", sa.BigInteger(), nullable=True),
        sa.Column("concurrent_streams", sa.Integer(), nullable=True),
        sa.Column("queued_jobs", sa.Integer(), nullable=True),
        sa.Column("running_evaluations", sa.Integer(), nullable=True),
        sa.Column("stored_bytes", sa.BigInteger(), nullable=True),
        sa.Column("update_time", sa.Float(), nullable=False),
        sa.Column("updated_by", sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint("tenant", "key_id", name=op.f("pk_quotas")),
    )


def downgrade() -> None:
    op.drop_table("quotas")
