"""limits: named downstreams, each with its own RPM, processor, options and slots

The `default` limit takes the deployment's recorded RPM (or the environment's, if none
was recorded), its ID_PROCESSOR and, for the HTTP processor, its PROCESSOR_HTTP_*
settings, so that every client and configuration keeps working unchanged. RPM then lives
in the limit's row only.

Revision ID: 0008
Revises: 0007
"""

import json

import sqlalchemy as sa
from alembic import op
from flask import current_app
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

HTTP_PROCESSOR = "workers.processors:http_request"


def upgrade():
    op.create_table(
        "limits",
        sa.Column("id", sa.SmallInteger(), sa.Identity(start=1), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("rpm", sa.Integer(), nullable=False),
        sa.Column("processor", sa.String(length=255), nullable=False),
        sa.Column(
            "options",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("paused", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.CheckConstraint("rpm >= 1", name=op.f("ck_limits_rpm")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_limits")),
        sa.UniqueConstraint("name", name=op.f("uq_limits_name")),
    )
    default_id = _create_default()
    op.execute("DELETE FROM settings WHERE name = 'RPM'")

    # A fast default: existing rows take the default limit without being rewritten.
    for table in ("slots", "assignments", "id_tasks"):
        op.add_column(
            table,
            sa.Column(
                "limit_id",
                sa.SmallInteger(),
                server_default=str(default_id),
                nullable=table == "id_tasks",
            ),
        )
        op.alter_column(table, "limit_id", server_default=None)
    op.drop_constraint("pk_slots", "slots", type_="primary")
    op.create_primary_key("pk_slots", "slots", ["limit_id", "slot_start"])
    op.create_foreign_key(
        op.f("fk_slots_limit_id_limits"), "slots", "limits", ["limit_id"], ["id"], ondelete="CASCADE"
    )
    op.create_foreign_key(
        op.f("fk_id_tasks_limit_id_limits"),
        "id_tasks",
        "limits",
        ["limit_id"],
        ["id"],
        ondelete="SET NULL",
    )
    op.create_index("ix_id_tasks_limit_id", "id_tasks", ["limit_id"])
    op.drop_index("ix_assignments_pending_by_slot", table_name="assignments")
    op.create_index(
        "ix_assignments_pending_by_slot",
        "assignments",
        ["limit_id", "slot_start", "task_id", "position"],
        postgresql_where=sa.text("status = 'pending'"),
    )


def _create_default() -> int:
    """The default limit from the recorded RPM and this app's processor settings."""
    config = current_app.config
    options = {}
    if config["ID_PROCESSOR"] == HTTP_PROCESSOR:
        options = {
            "url": config["PROCESSOR_HTTP_URL"],
            "method": config["PROCESSOR_HTTP_METHOD"],
            "timeout": config["PROCESSOR_HTTP_TIMEOUT"],
        }
    connection = op.get_bind()
    recorded = connection.execute(sa.text("SELECT value FROM settings WHERE name = 'RPM'"))
    rpm = recorded.scalar() or config["RPM"]
    return connection.execute(
        sa.text(
            "INSERT INTO limits (name, rpm, processor, options) "
            "VALUES ('default', :rpm, :processor, CAST(:options AS jsonb)) RETURNING id"
        ),
        {
            "rpm": rpm,
            "processor": config["ID_PROCESSOR"],
            "options": json.dumps({k: v for k, v in options.items() if v is not None}),
        },
    ).scalar()


def downgrade():
    # One plan again: the default limit's. Other limits' slots go; their IDs stay
    # recorded under the slots they had.
    op.execute(
        "INSERT INTO settings (name, value) SELECT 'RPM', rpm FROM limits WHERE name = 'default'"
    )
    op.execute(
        "DELETE FROM slots WHERE limit_id IS DISTINCT FROM "
        "(SELECT id FROM limits WHERE name = 'default')"
    )
    op.drop_index("ix_assignments_pending_by_slot", table_name="assignments")
    op.create_index(
        "ix_assignments_pending_by_slot",
        "assignments",
        ["slot_start", "task_id", "position"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.drop_index("ix_id_tasks_limit_id", table_name="id_tasks")
    op.drop_constraint(op.f("fk_id_tasks_limit_id_limits"), "id_tasks", type_="foreignkey")
    op.drop_constraint(op.f("fk_slots_limit_id_limits"), "slots", type_="foreignkey")
    op.drop_constraint("pk_slots", "slots", type_="primary")
    op.create_primary_key("pk_slots", "slots", ["slot_start"])
    for table in ("id_tasks", "assignments", "slots"):
        op.drop_column(table, "limit_id")
    op.drop_table("limits")
