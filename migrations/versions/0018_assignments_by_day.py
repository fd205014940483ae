"""assignments partitioned by day: one partition per UTC day of the tasks' creation

`assignments` becomes a table partitioned by RANGE of a new column, `task_day`: the UTC
day its task was created, part of the primary key (task_id, position, task_day). A task
never changes its day, so a re-plan or a retry never moves a row between partitions (an
UPDATE that did would be a delete and an insert, and would fail a concurrent claim of
the row), and all of a task's IDs share one partition, dropped whole by retention once
the day's tasks are finished and old (service/retention/). A partition is made for every
day that has a task, and for today and the next PARTITION_DAYS_AHEAD days; the scheduler
makes the later ones as time passes.

This revision rewrites `assignments`. The table is renamed and its rows copied into the
partitions, then its indexes are built on them, under the ACCESS EXCLUSIVE lock that the
rename takes: until the revision commits, no read or write of `assignments` goes on
(claims, plans and `/ids/` wait for it). About 2 s per million rows on a 2-core machine
(see docs/upgrading.md, "Revisions"); allow for it in MIGRATION_STATEMENT_TIMEOUT.

A row whose task is gone (none should be: the planner writes rows only for a task it
holds) takes its slot's day.

The downgrade copies the rows back into one table, as long as the upgrade; nothing is
lost but the partitions.

Revision ID: 0018
Revises: 0017
"""

from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

COLUMNS = (
    "task_id, position, user_id, slot_start, status, attempts, error, finished_at, "
    "claimed_at, claimed_by, retry_at, limit_id, claimed_until, refusals, replanned_in"
)
TABLE = """
    task_id bigint NOT NULL,
    position integer NOT NULL,
    user_id bigint NOT NULL,
    slot_start timestamptz NOT NULL,
    status varchar(16) NOT NULL,
    attempts smallint NOT NULL DEFAULT '0',
    error text,
    finished_at timestamptz,
    claimed_at timestamptz,
    claimed_by integer,
    retry_at timestamptz,
    limit_id integer NOT NULL,
    claimed_until timestamptz,
    refusals smallint NOT NULL DEFAULT '0',
    replanned_in bigint,
    CONSTRAINT ck_assignments_status CHECK (status IN
        ('pending', 'running', 'done', 'failed', 'cancelled', 'retrying'))
"""
INDEXES = {
    "ix_assignments_pending_by_slot": (
        "(limit_id, slot_start, task_id, position) WHERE status = 'pending'"
    ),
    "ix_assignments_retrying": "(task_id) WHERE status = 'retrying'",
    "ix_assignments_running_since": "(claimed_at) WHERE status = 'running'",
}
# As service/core/partitions.py makes them then; this revision keeps its own copy.
STORAGE = (
    "autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 1000, "
    "autovacuum_vacuum_insert_scale_factor = 0.05, autovacuum_analyze_scale_factor = 0.02"
)
DAYS_AHEAD = 2
TASK_DAY = "(t.date_created AT TIME ZONE 'UTC')::date"
SLOT_DAY = "(a.slot_start AT TIME ZONE 'UTC')::date"


def upgrade():
    _set_aside("unpartitioned")
    op.execute(
        f"CREATE TABLE assignments ({TABLE}, task_day date NOT NULL) PARTITION BY RANGE (task_day)"
    )
    _make_partitions()
    op.execute(
        f"INSERT INTO assignments ({COLUMNS}, task_day) "
        f"SELECT {', '.join('a.' + c for c in COLUMNS.split(', '))}, "
        f"  coalesce({TASK_DAY}, {SLOT_DAY}) "
        "FROM assignments_unpartitioned AS a LEFT JOIN id_tasks AS t ON t.id = a.task_id"
    )
    op.execute("DROP TABLE assignments_unpartitioned")
    _build_keys("task_id, position, task_day")


def downgrade():
    _set_aside("partitioned")
    op.execute(f"CREATE TABLE assignments ({TABLE})")
    op.execute(f"INSERT INTO assignments ({COLUMNS}) SELECT {COLUMNS} FROM assignments_partitioned")
    op.execute("DROP TABLE assignments_partitioned")
    _build_keys("task_id, position")


def _set_aside(suffix: str) -> None:
    """Rename the table and its indexes, so that the new one takes their names."""
    op.execute("LOCK TABLE assignments IN ACCESS EXCLUSIVE MODE")
    op.execute(f"ALTER TABLE assignments RENAME TO assignments_{suffix}")
    for index in ("pk_assignments", *INDEXES):
        op.execute(f"ALTER INDEX {index} RENAME TO {index}_{suffix}")


def _make_partitions() -> None:
    # One statement, so that the SQL script makes the same partitions as an online run.
    op.execute(
        f"""
        DO $$
        DECLARE day date;
        BEGIN
            FOR day IN
                SELECT DISTINCT {TASK_DAY} FROM id_tasks AS t
                UNION SELECT DISTINCT {SLOT_DAY} FROM assignments_unpartitioned AS a
                    WHERE NOT EXISTS (SELECT FROM id_tasks AS t WHERE t.id = a.task_id)
                UNION SELECT (now() AT TIME ZONE 'UTC')::date + n
                    FROM generate_series(0, {DAYS_AHEAD}) AS n
            LOOP
                EXECUTE format(
                    'CREATE TABLE %I PARTITION OF assignments FOR VALUES FROM (%L) TO (%L) '
                    'WITH ({STORAGE})',
                    'assignments_' || to_char(day, 'YYYYMMDD'), day, day + 1);
            END LOOP;
        END $$
        """
    )


def _build_keys(primary_key: str) -> None:
    op.execute(f"ALTER TABLE assignments ADD CONSTRAINT pk_assignments PRIMARY KEY ({primary_key})")
    for name, definition in INDEXES.items():
        columns, predicate = definition.split(" WHERE ")
        op.execute(f"CREATE INDEX {name} ON assignments {columns} WHERE {predicate}")
    op.execute("ANALYZE assignments")
