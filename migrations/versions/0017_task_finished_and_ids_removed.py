"""id_tasks.finished_at and ids_removed_at: what retention needs to know of a task

- `finished_at`: when the task reached a finished status (done, failed, cancelled,
  refused). Its IDs are kept RETENTION_DAYS from then. Tasks finished before this
  revision take their last ID's finish, or their last update when none has one.
- `ids_removed_at`: when retention dropped the task's day of IDs; its `/ids/` then
  answer 410 Gone, saying so.

Both nullable with no default: nothing is rewritten. The backfill reads each finished
task's IDs once, through the primary key of `assignments`.

The downgrade refuses, changing nothing, while a task's IDs have been removed: below
0017 such a task would list no IDs, as if it had never had any, instead of saying that
they are gone. It then drops both columns.

Revision ID: 0017
Revises: 0016
"""

import sqlalchemy as sa
from alembic import context, op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

TIMESTAMP = sa.DateTime(timezone=True)
FINISHED = "('done', 'failed', 'cancelled', 'refused')"


def upgrade():
    op.add_column("id_tasks", sa.Column("finished_at", TIMESTAMP, nullable=True))
    op.add_column("id_tasks", sa.Column("ids_removed_at", TIMESTAMP, nullable=True))
    op.execute(
        "UPDATE id_tasks AS t SET finished_at = coalesce("
        "  (SELECT max(a.finished_at) FROM assignments AS a WHERE a.task_id = t.id), "
        f"  t.date_updated) WHERE t.status IN {FINISHED}"
    )


def downgrade():
    op.execute("LOCK TABLE id_tasks IN SHARE MODE")
    _refuse_while_ids_are_removed()
    op.drop_column("id_tasks", "ids_removed_at")
    op.drop_column("id_tasks", "finished_at")


class IdsRemoved(RuntimeError):
    """Below 0017 a task whose IDs retention removed would seem to have had none."""


def _refuse_while_ids_are_removed() -> None:
    message = (
        "downgrade below 0017 refused: {n} tasks had their IDs removed by retention; "
        "below 0017 they would list no IDs instead of saying that they are gone. "
        "Delete those tasks, or stay at 0017. No data was changed."
    )
    if context.is_offline_mode():
        op.execute(
            f"""
            DO $$
            DECLARE n bigint;
            BEGIN
                SELECT count(*) INTO n FROM id_tasks WHERE ids_removed_at IS NOT NULL;
                IF n > 0 THEN
                    RAISE EXCEPTION USING MESSAGE = replace('{message}', '{{n}}', n::text);
                END IF;
            END $$
            """
        )
        return
    removed = op.get_bind().execute(
        sa.text("SELECT count(*) FROM id_tasks WHERE ids_removed_at IS NOT NULL")
    ).scalar()
    if removed:
        raise IdsRemoved(message.format(n=f"{removed:,}"))
