"""users, ID tasks and their IDs

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "users",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False, start=1), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=True),
        sa.Column("date_created", sa.DateTime(timezone=True), server_default=sa.text("now()"),
                  nullable=False),
        sa.Column("last_processed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("times_processed", sa.Integer(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
    )
    op.create_index("ix_users_newest", "users", ["date_created", "id"])

    op.create_table(
        "id_tasks",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False, start=1), nullable=False),
        sa.Column("task_name", sa.String(length=255), nullable=False),
        sa.Column("overflow", sa.String(length=8), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("payload", sa.Text(), nullable=True),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("duplicates", sa.Integer(), nullable=False),
        sa.Column("planned", sa.Integer(), nullable=False),
        sa.Column("done", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("first_slot", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_slot", sa.DateTime(timezone=True), nullable=True),
        sa.Column("date_created", sa.DateTime(timezone=True), server_default=sa.text("now()"),
                  nullable=False),
        sa.Column("date_updated", sa.DateTime(timezone=True), server_default=sa.text("now()"),
                  nullable=False),
        sa.CheckConstraint("overflow IN ('spread', 'defer')", name=op.f("ck_id_tasks_overflow")),
        sa.CheckConstraint(
            "status IN ('received', 'planning', 'scheduled', 'running', 'done', 'failed', "
            "'cancelled')",
            name=op.f("ck_id_tasks_status"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_id_tasks")),
    )
    op.create_index("ix_id_tasks_newest", "id_tasks", ["date_created", "id"])
    op.create_index("ix_id_tasks_status", "id_tasks", ["status"])

    op.create_table(
        "task_id_chunks",
        sa.Column("task_id", sa.BigInteger(), nullable=False),
        sa.Column("chunk_no", sa.Integer(), nullable=False),
        sa.Column("ids", postgresql.ARRAY(sa.BigInteger()), nullable=False),
        sa.ForeignKeyConstraint(["task_id"], ["id_tasks.id"], ondelete="CASCADE",
                                name=op.f("fk_task_id_chunks_task_id_id_tasks")),
        sa.PrimaryKeyConstraint("task_id", "chunk_no", name=op.f("pk_task_id_chunks")),
    )


def downgrade():
    op.drop_table("task_id_chunks")
    op.drop_table("id_tasks")
    op.drop_table("users")
