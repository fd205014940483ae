"""limits.id and the columns that reference it as INTEGER

limits.id was a SMALLINT identity: after 32,767 limits created (deleted ones count too)
no limit could be created any more. It becomes INTEGER, and its identity's sequence with
it (max_value 2,147,483,647), as do the columns that hold a limit's id:
id_tasks.limit_id, slots.limit_id (part of the primary key of slots) and
assignments.limit_id.

This revision rewrites big tables. SMALLINT to INTEGER changes how a value is stored, so
PostgreSQL rewrites each of the four tables and rebuilds their indexes, under an ACCESS
EXCLUSIVE lock taken on all four at once at the start: until the revision commits, no
read or write of limits, id_tasks, slots or assignments goes on (requests and claims wait
for it). assignments, a row per ID, takes nearly all of the time: 1.4 to 2 s per million
rows on a 2-core machine, 6.2 s for 4 million (see docs/upgrading.md, "Revisions"); allow
for it in MIGRATION_STATEMENT_TIMEOUT (30 minutes by default).

The downgrade narrows the columns back. It refuses, changing nothing, while a limit's id
or an ID's recorded limit is above 32,767: a SMALLINT cannot hold it.

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import context, op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

SMALLINT_MAX = 32767
INTEGER_MAX = 2147483647
# limits first: each ALTER below checks again the foreign keys that meet the column.
COLUMNS = [
    ("limits", "id"),
    ("id_tasks", "limit_id"),
    ("slots", "limit_id"),
    ("assignments", "limit_id"),
]


def upgrade():
    _lock_all()
    for table, column in COLUMNS:
        op.alter_column(table, column, type_=sa.Integer(), existing_type=sa.SmallInteger())
    # PostgreSQL widens an identity's sequence with its column; say so anyway, for a
    # sequence whose bound was set by hand.
    op.execute(f"ALTER TABLE limits ALTER COLUMN id SET MAXVALUE {INTEGER_MAX}")


def downgrade():
    _lock_all()
    _refuse_ids_above_smallint()
    # A sequence beyond the SMALLINT range (limits created above it, then deleted) cannot
    # be narrowed: it goes on from the largest id still recorded anywhere, so a new limit
    # never takes the id of a deleted one whose IDs are still recorded.
    op.execute(
        "SELECT setval(pg_get_serial_sequence('limits', 'id'), greatest("
        "(SELECT max(id) FROM limits), (SELECT max(limit_id) FROM assignments), 1)) "
        "WHERE pg_sequence_last_value(pg_get_serial_sequence('limits', 'id')::regclass) "
        f"> {SMALLINT_MAX}"
    )
    for table, column in reversed(COLUMNS):
        op.alter_column(table, column, type_=sa.SmallInteger(), existing_type=sa.Integer())


def _lock_all() -> None:
    # Every lock at once, before any rewrite: a lock not granted within lock_timeout then
    # fails the revision before it has done any work, and it is tried again.
    op.execute(
        "LOCK TABLE " + ", ".join(table for table, _ in COLUMNS) + " IN ACCESS EXCLUSIVE MODE"
    )


class IdsAboveSmallint(RuntimeError):
    """The downgrade would have to drop ids that a SMALLINT column cannot hold."""


def _refuse_ids_above_smallint() -> None:
    if context.is_offline_mode():
        # The SQL script refuses as the online downgrade does, when it is run.
        op.execute(
            f"""
            DO $$
            BEGIN
                IF EXISTS (SELECT 1 FROM limits WHERE id > {SMALLINT_MAX})
                    OR EXISTS (SELECT 1 FROM assignments WHERE limit_id > {SMALLINT_MAX}) THEN
                    RAISE EXCEPTION USING MESSAGE = 'downgrade below 0012 refused: limit '
                        || 'ids above {SMALLINT_MAX} are recorded, which a SMALLINT '
                        || 'cannot hold; no data was changed';
                END IF;
            END $$
            """
        )
        return
    connection = op.get_bind()
    limits = connection.execute(
        sa.text(f"SELECT name, id FROM limits WHERE id > {SMALLINT_MAX} ORDER BY id")
    ).all()
    ids = connection.execute(
        sa.text(f"SELECT count(*) FROM assignments WHERE limit_id > {SMALLINT_MAX}")
    ).scalar()
    if not limits and not ids:
        return
    named = ", ".join(f"{name} (id {id_})" for name, id_ in limits) or "none"
    raise IdsAboveSmallint(
        f"downgrade below 0012 refused: before 0012 a limit's id is a SMALLINT, at most "
        f"{SMALLINT_MAX:,}, and {len(limits)} limits have a larger one: {named}; {ids} IDs "
        "of tasks are recorded under such limits (deleted ones included). Narrowing would "
        "lose those limits and the limit of every such ID. Delete those limits and the "
        "tasks they planned, or stay at 0012. No data was changed."
    )
