"""the plan: slots and the assignment of each ID to one

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "slots",
        sa.Column("slot_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("load", sa.Integer(), server_default="0", nullable=False),
        sa.Column("done", sa.Integer(), server_default="0", nullable=False),
        sa.Column("failed", sa.Integer(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("slot_start", name=op.f("pk_slots")),
    )
    op.create_table(
        "assignments",
        sa.Column("task_id", sa.BigInteger(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("slot_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.SmallInteger(), server_default="0", nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'running', 'done', 'failed', 'cancelled')",
            name=op.f("ck_assignments_status"),
        ),
        sa.PrimaryKeyConstraint("task_id", "position", name=op.f("pk_assignments")),
    )
    op.create_index(
        "ix_assignments_pending_by_slot",
        "assignments",
        ["slot_start"],
        postgresql_where=sa.text("status = 'pending'"),
    )


def downgrade():
    op.drop_table("assignments")
    op.drop_table("slots")
