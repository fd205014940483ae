"""id_tasks.error and the status `refused`: a task whose plan would go past the horizon

`error` is nullable with no default: nothing is rewritten. The check on `status` is
dropped and added again with `refused`; adding it reads id_tasks (a row per task, not
per ID) under the table's lock, a moment.

The downgrade refuses, changing nothing, while a task is `refused`: below 0014 that
status does not exist, and the reason kept in `error` would be lost. Cancel such tasks
first (DELETE /celery_ids_tasks/<id>/), or give them IDs that fit (PUT).

Revision ID: 0014
Revises: 0013
"""

import sqlalchemy as sa
from alembic import context, op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

CHECK = "ck_id_tasks_status"
BEFORE = ("received", "planning", "scheduled", "running", "done", "failed", "cancelled")
NOW = (*BEFORE, "refused")


def upgrade():
    op.add_column("id_tasks", sa.Column("error", sa.Text(), nullable=True))
    _check_statuses(NOW)


def downgrade():
    # Locked first: no task can be refused between the look and the change.
    op.execute("LOCK TABLE id_tasks IN ACCESS EXCLUSIVE MODE")
    _refuse_while_tasks_are_refused()
    _check_statuses(BEFORE)
    op.drop_column("id_tasks", "error")


def _check_statuses(statuses: tuple[str, ...]) -> None:
    op.drop_constraint(op.f(CHECK), "id_tasks", type_="check")
    listed = ", ".join(f"'{status}'" for status in statuses)
    op.create_check_constraint(op.f(CHECK), "id_tasks", f"status IN ({listed})")


class RefusedTasksExist(RuntimeError):
    """The downgrade would lose the status and the reason of refused tasks."""


def _refuse_while_tasks_are_refused() -> None:
    if context.is_offline_mode():
        # The SQL script refuses as the online downgrade does, when it is run.
        op.execute(
            """
            DO $$
            BEGIN
                IF EXISTS (SELECT 1 FROM id_tasks WHERE status = 'refused') THEN
                    RAISE EXCEPTION USING MESSAGE = 'downgrade below 0014 refused: tasks '
                        || 'are refused (their plans would have gone past the horizon); '
                        || 'cancel them first; no data was changed';
                END IF;
            END $$
            """
        )
        return
    ids = (
        op.get_bind()
        .execute(sa.text("SELECT id FROM id_tasks WHERE status = 'refused' ORDER BY id LIMIT 11"))
        .scalars()
        .all()
    )
    if not ids:
        return
    more = " and more" if len(ids) > 10 else ""
    listed = ", ".join(str(task_id) for task_id in ids[:10]) + more
    raise RefusedTasksExist(
        f"downgrade below 0014 refused: tasks {listed} are refused (their plans would have "
        "gone past the horizon). Below 0014 that status does not exist and the reason "
        "would be lost: cancel them (DELETE /celery_ids_tasks/<id>/) or give them IDs "
        "that fit (PUT), then downgrade again. No data was changed."
    )
