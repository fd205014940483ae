"""claims held by live claimers, paced turns, retries planned by a job of their own

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

STATUSES = "'pending', 'running', 'done', 'failed', 'cancelled'"


def upgrade():
    op.execute("CREATE SEQUENCE claimer_ids AS integer CYCLE")
    op.add_column("assignments", sa.Column("claimed_by", sa.Integer(), nullable=True))
    op.add_column("assignments", sa.Column("retry_at", sa.DateTime(timezone=True), nullable=True))
    op.drop_constraint(op.f("ck_assignments_status"), "assignments", type_="check")
    op.create_check_constraint(
        op.f("ck_assignments_status"), "assignments", f"status IN ({STATUSES}, 'retrying')"
    )
    op.create_index(
        "ix_assignments_retrying",
        "assignments",
        ["task_id"],
        postgresql_where=sa.text("status = 'retrying'"),
    )
    # Claims take a slot's IDs in plan order, straight from the index.
    op.drop_index("ix_assignments_pending_by_slot", table_name="assignments")
    op.create_index(
        "ix_assignments_pending_by_slot",
        "assignments",
        ["slot_start", "task_id", "position"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.drop_column("slots", "claimed")
    op.add_column("slots", sa.Column("next_turn_at", sa.DateTime(timezone=True), nullable=True))


def downgrade():
    op.drop_column("slots", "next_turn_at")
    op.add_column("slots", sa.Column("claimed", sa.Integer(), server_default="0", nullable=False))
    op.drop_index("ix_assignments_pending_by_slot", table_name="assignments")
    op.create_index(
        "ix_assignments_pending_by_slot",
        "assignments",
        ["slot_start"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.drop_index("ix_assignments_retrying", table_name="assignments")
    op.execute("UPDATE assignments SET status = 'pending' WHERE status = 'retrying'")
    op.drop_constraint(op.f("ck_assignments_status"), "assignments", type_="check")
    op.create_check_constraint(
        op.f("ck_assignments_status"), "assignments", f"status IN ({STATUSES})"
    )
    op.drop_column("assignments", "retry_at")
    op.drop_column("assignments", "claimed_by")
    op.execute("DROP SEQUENCE claimer_ids")
