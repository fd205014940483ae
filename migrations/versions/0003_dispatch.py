"""dispatch: claims, pacing and lateness of slots

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("slots", sa.Column("claimed", sa.Integer(), server_default="0", nullable=False))
    op.add_column("slots", sa.Column("started_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("slots", sa.Column("last_claim_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "slots", sa.Column("late", sa.Boolean(), server_default=sa.text("false"), nullable=False)
    )
    op.add_column("assignments", sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_assignments_running_since",
        "assignments",
        ["claimed_at"],
        postgresql_where=sa.text("status = 'running'"),
    )


def downgrade():
    op.drop_index("ix_assignments_running_since", table_name="assignments")
    op.drop_column("assignments", "claimed_at")
    op.drop_column("slots", "late")
    op.drop_column("slots", "last_claim_at")
    op.drop_column("slots", "started_at")
    op.drop_column("slots", "claimed")
