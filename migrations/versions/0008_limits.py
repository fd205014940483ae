"""limits: named downstreams, each with its own RPM, processor, options and slots

The `default` limit takes the deployment's recorded RPM (or the environment's, if none
was recorded), its ID_PROCESSOR and, for the HTTP processor, its PROCESSOR_HTTP_*
settings, so that every client and configuration keeps working unchanged. RPM then lives
in the limit's row only.

Every step is quick on a big table: the new columns take a constant default (no rewrite),
and the index of pending IDs by limit is built concurrently by the next revision, 0009.
The downgrade refuses while limits other than `default` hold pending IDs: it would drop
their slots.

Revision ID: 0008
Revises: 0007
"""

import json
from contextlib import contextmanager

import sqlalchemy as sa
from alembic import context, op
from flask import current_app
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

HTTP_PROCESSOR = "workers.processors:http_request"

PENDING_INDEX = "ix_assignments_pending_by_slot"
# The name an index of pending IDs is built under before it takes PENDING_INDEX's (0009
# builds under it too).
PENDING_INDEX_BUILD = "ix_assignments_pending_by_slot_build"
# PENDING_INDEX as it stood before this revision, and as a downgrade leaves it.
PENDING_COLUMNS = ["slot_start", "task_id", "position"]
PENDING_PREDICATE = "((status)::text = 'pending'::text)"


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
    # One plan again: the default limit's. Other limits' slots would go, so a downgrade
    # is refused while they hold pending IDs; their other IDs stay recorded under the
    # slots they had.
    _refuse_while_other_limits_have_pending_ids()
    _build_old_pending_index()
    # Everything else takes its locks at once, in one quick transaction.
    op.execute("LOCK TABLE slots, assignments, id_tasks IN ACCESS EXCLUSIVE MODE")
    _refuse_while_other_limits_have_pending_ids()  # none planned since the first look
    op.execute(
        "INSERT INTO settings (name, value) SELECT 'RPM', rpm FROM limits WHERE name = 'default'"
    )
    op.execute(
        "DELETE FROM slots WHERE limit_id IS DISTINCT FROM "
        "(SELECT id FROM limits WHERE name = 'default')"
    )
    if context.is_offline_mode() or _index(PENDING_INDEX_BUILD) is not None:
        op.drop_index(PENDING_INDEX, table_name="assignments", if_exists=True)
        op.execute(f"ALTER INDEX {PENDING_INDEX_BUILD} RENAME TO {PENDING_INDEX}")
    op.drop_index("ix_id_tasks_limit_id", table_name="id_tasks")
    op.drop_constraint(op.f("fk_id_tasks_limit_id_limits"), "id_tasks", type_="foreignkey")
    op.drop_constraint(op.f("fk_slots_limit_id_limits"), "slots", type_="foreignkey")
    op.drop_constraint("pk_slots", "slots", type_="primary")
    op.create_primary_key("pk_slots", "slots", ["slot_start"])
    for table in ("id_tasks", "assignments", "slots"):
        op.drop_column(table, "limit_id")
    op.drop_table("limits")


class PendingIdsInOtherLimits(RuntimeError):
    """The downgrade would drop the slots of limits that still have IDs to send."""


def _refuse_while_other_limits_have_pending_ids() -> None:
    if context.is_offline_mode():
        # The SQL script refuses as the online downgrade does, when it is run.
        op.execute(
            """
            DO $$
            DECLARE pending bigint;
            BEGIN
                SELECT count(*) INTO pending FROM assignments
                WHERE status = 'pending' AND limit_id IS DISTINCT FROM
                    (SELECT id FROM limits WHERE name = 'default');
                IF pending > 0 THEN
                    RAISE EXCEPTION USING MESSAGE = 'downgrade below 0008 refused: '
                        || pending || ' IDs are pending in limits other than default; '
                        || 'their slots would be dropped';
                END IF;
            END $$
            """
        )
        return
    connection = op.get_bind()
    default_id = connection.execute(
        sa.text("SELECT id FROM limits WHERE name = 'default'")
    ).scalar()
    # Two ranges rather than `<>`: an index scan finds none quickly, even under a lock.
    others = "true" if default_id is None else "(a.limit_id < :d OR a.limit_id > :d)"
    rows = connection.execute(
        sa.text(
            "SELECT coalesce(l.name, 'limit ' || a.limit_id), count(*) FROM assignments a "
            "LEFT JOIN limits l ON l.id = a.limit_id "
            f"WHERE a.status = 'pending' AND {others} GROUP BY 1 ORDER BY 2 DESC, 1"
        ),
        {"d": default_id},
    ).all()
    if not rows:
        return
    total = sum(count for _, count in rows)
    limits = ", ".join(f"{name} ({count})" for name, count in rows)
    raise PendingIdsInOtherLimits(
        f"downgrade below 0008 refused: {total} IDs are pending in limits other than "
        f"default: {limits}. Before 0008 there is one plan, the default limit's, and their "
        "slots would be dropped. Let them run (resume a paused limit) or cancel their tasks "
        "(DELETE /celery_ids_tasks/<id>/), then downgrade again. No data was changed."
    )


def _index(name: str):
    """(valid, columns, predicate) of the index `name` on assignments, or None."""
    row = (
        op.get_bind()
        .execute(
            sa.text(
                "SELECT i.indisvalid, "
                "ARRAY(SELECT a.attname::text FROM unnest(i.indkey::int2[]) "
                "WITH ORDINALITY AS k(attnum, n) JOIN pg_attribute a "
                "ON a.attrelid = i.indrelid AND a.attnum = k.attnum ORDER BY k.n), "
                "pg_get_expr(i.indpred, i.indrelid) "
                "FROM pg_index i WHERE i.indexrelid = to_regclass(:name) "
                "AND i.indrelid = to_regclass('assignments')"
            ),
            {"name": name},
        )
        .one_or_none()
    )
    return None if row is None else tuple(row)


def _build_old_pending_index() -> None:
    """The index of pending IDs without limit_id, built beside the current one.

    Built concurrently, it blocks no read or write of assignments. Dropping limit_id
    drops the current index; this one then takes its name.
    """
    wanted = (True, PENDING_COLUMNS, PENDING_PREDICATE)
    offline = context.is_offline_mode()
    if not offline and _index(PENDING_INDEX) == wanted:
        return
    with op.get_context().autocommit_block(), _waits_block_no_one():
        leftover = None if offline else _index(PENDING_INDEX_BUILD)
        if offline or (leftover is not None and leftover != wanted):
            # INVALID after an attempt that failed, or built by 0009.
            op.drop_index(
                PENDING_INDEX_BUILD,
                table_name="assignments",
                postgresql_concurrently=True,
                if_exists=True,
            )
        op.create_index(
            PENDING_INDEX_BUILD,
            "assignments",
            PENDING_COLUMNS,
            postgresql_where=sa.text("status = 'pending'"),
            postgresql_concurrently=True,
            if_not_exists=True,
        )


@contextmanager
def _waits_block_no_one():
    """lock_timeout as long as statement_timeout, for the statements run CONCURRENTLY.

    They wait for older transactions to end, but take no lock that reads or writes queue
    behind: a short lock_timeout would only make them fail, leaving an INVALID index,
    whenever a transaction of the service runs longer than it.
    """
    if context.is_offline_mode():
        yield
        return
    bind = op.get_bind()
    saved = bind.execute(sa.text("SHOW lock_timeout")).scalar()
    bind.execute(
        sa.text("SELECT set_config('lock_timeout', current_setting('statement_timeout'), false)")
    )
    try:
        yield
    finally:
        bind.execute(sa.text("SELECT set_config('lock_timeout', :value, false)"), {"value": saved})
