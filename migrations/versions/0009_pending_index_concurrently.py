"""the index of pending IDs leads with their limit, built concurrently

Claims take a limit's slot's pending IDs in plan order straight from
ix_assignments_pending_by_slot (limit_id, slot_start, task_id, position WHERE status =
'pending'). This revision builds it with CREATE INDEX CONCURRENTLY under a name of its own,
drops the index it replaces with DROP INDEX CONCURRENTLY and gives the new one its name: it
never blocks reads or writes of assignments, however big the table. An INVALID index left by
an earlier attempt that failed is dropped and built again.

Deployments that ran 0008 before it left this index to here already have it: for them this
revision changes nothing.

Revision ID: 0009
Revises: 0008
"""

from contextlib import contextmanager

import sqlalchemy as sa
from alembic import context, op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

PENDING_INDEX = "ix_assignments_pending_by_slot"
PENDING_INDEX_BUILD = "ix_assignments_pending_by_slot_build"
PENDING_COLUMNS = ["limit_id", "slot_start", "task_id", "position"]
PENDING_PREDICATE = "((status)::text = 'pending'::text)"
WANTED = (True, PENDING_COLUMNS, PENDING_PREDICATE)


def upgrade():
    offline = context.is_offline_mode()
    if not offline and _definition(PENDING_INDEX) == WANTED:
        if _definition(PENDING_INDEX_BUILD) is not None:
            with op.get_context().autocommit_block(), _waits_block_no_one():
                _drop_concurrently(PENDING_INDEX_BUILD)
        return
    with op.get_context().autocommit_block():
        with _waits_block_no_one():
            leftover = None if offline else _definition(PENDING_INDEX_BUILD)
            if offline or (leftover is not None and leftover != WANTED):
                # INVALID after an attempt that failed, or built for a downgrade.
                _drop_concurrently(PENDING_INDEX_BUILD)
            op.create_index(
                PENDING_INDEX_BUILD,
                "assignments",
                PENDING_COLUMNS,
                postgresql_where=sa.text("status = 'pending'"),
                postgresql_concurrently=True,
                if_not_exists=True,
            )
            _drop_concurrently(PENDING_INDEX)
        # Takes a lock on the index only, which reads and writes do not wait for.
        op.execute(f"ALTER INDEX {PENDING_INDEX_BUILD} RENAME TO {PENDING_INDEX}")


def downgrade():
    # Nothing to undo: the index is the one 0008 used to build, and 0008's downgrade
    # builds the index it had before (concurrently) when it drops limit_id.
    pass


def _drop_concurrently(name: str) -> None:
    op.drop_index(name, table_name="assignments", postgresql_concurrently=True, if_exists=True)


def _definition(name: str):
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
