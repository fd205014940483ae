"""ID tasks: submission, reading, replacement and cancellation."""

from __future__ import annotations

from collections.abc import Iterable

from flask import current_app
from sqlalchemy import select, text
from werkzeug.exceptions import Conflict, RequestEntityTooLarge

from .errors import not_found
from .extensions import db
from .models import IdTask, Overflow, TaskId, TaskStatus
from .queues import enqueue_planning

# Tasks up to this many IDs echo them in `payload`, as the original API did;
# larger ones are read page by page from /ids/ so that lists stay small.
PAYLOAD_ECHO_MAX_IDS = 1000
# The statuses in which no ID has been handed to a worker yet.
REPLANNABLE = (TaskStatus.RECEIVED, TaskStatus.PLANNING, TaskStatus.SCHEDULED)


def raw_connection():
    """The psycopg connection under the session, in the session's transaction."""
    return db.session.connection().connection.driver_connection


def list_tasks(offset: int, limit: int) -> tuple[list[IdTask], int]:
    query = select(IdTask).order_by(IdTask.date_created.desc(), IdTask.id.desc())
    tasks = db.session.scalars(query.offset(offset).limit(limit)).all()
    return tasks, db.session.scalar(text("SELECT count(*) FROM id_tasks"))


def get_task(task_id: int, *, lock: bool = False) -> IdTask:
    query = select(IdTask).where(IdTask.id == task_id)
    task = db.session.scalar(query.with_for_update() if lock else query)
    if task is None:
        raise not_found("task", task_id)
    return task


def submit_task(task_name: str, ids: Iterable[int], overflow: str | None = None) -> IdTask:
    """Store a task and its distinct IDs in one transaction, then queue its planning."""
    task = IdTask(
        task_name=task_name, overflow=overflow or Overflow.SPREAD, status=TaskStatus.RECEIVED
    )
    db.session.add(task)
    db.session.flush()
    _store_ids(task, ids)
    db.session.commit()
    enqueue_planning(task.id)
    return task


def update_task(task_id: int, changes: dict) -> IdTask:
    """Rename at any time; new IDs or overflow only while none has run, and re-plan."""
    task = get_task(task_id, lock=True)
    if "task_name" in changes:
        task.task_name = changes["task_name"]
    replan = "ids" in changes or ("overflow" in changes and changes["overflow"] != task.overflow)
    if replan:
        _require_replannable(task)
        task.overflow = changes.get("overflow", task.overflow)
        if "ids" in changes:
            db.session.execute(TaskId.__table__.delete().where(TaskId.task_id == task.id))
            _store_ids(task, changes["ids"])
        _reset_plan(task)
    db.session.commit()
    if replan:
        enqueue_planning(task.id)
    return task


def cancel_task(task_id: int) -> None:
    task = get_task(task_id, lock=True)
    if task.status == TaskStatus.CANCELLED:
        return
    if task.status in TaskStatus.FINISHED:
        raise Conflict(f"task {task_id} has already finished ({task.status})")
    task.status = TaskStatus.CANCELLED
    db.session.commit()


def list_task_ids(task_id: int, offset: int, limit: int) -> tuple[list[dict], int]:
    task = get_task(task_id)
    rows = db.session.execute(
        select(TaskId.position, TaskId.user_id)
        .where(TaskId.task_id == task_id)
        .order_by(TaskId.position)
        .offset(offset)
        .limit(limit)
    )
    status = "cancelled" if task.status == TaskStatus.CANCELLED else "received"
    items = [
        {
            "position": position,
            "user_id": user_id,
            "slot": None,
            "status": status,
            "attempts": 0,
            "error": None,
            "finished_at": None,
        }
        for position, user_id in rows
    ]
    return items, task.total


def _require_replannable(task: IdTask) -> None:
    if task.status not in REPLANNABLE:
        raise Conflict(
            f"task {task.id} is {task.status}: its IDs can change only before any has run"
        )


def _reset_plan(task: IdTask) -> None:
    task.status = TaskStatus.RECEIVED
    task.planned = task.done = task.failed = 0
    task.first_slot = task.last_slot = None


def _store_ids(task: IdTask, ids: Iterable[int]) -> None:
    """COPY the IDs into a staging table, then keep the first occurrence of each.

    PostgreSQL does the de-duplication, so memory stays flat however many IDs come.
    """
    limit = current_app.config["MAX_IDS_PER_TASK"]
    conn = raw_connection()
    with conn.cursor() as cur:
        cur.execute(
            "CREATE TEMP TABLE IF NOT EXISTS staged_ids (position bigint, user_id bigint) "
            "ON COMMIT DELETE ROWS"
        )
        submitted = 0
        with cur.copy("COPY staged_ids (position, user_id) FROM STDIN") as copy:
            for submitted, user_id in enumerate(ids, start=1):
                if submitted > limit:
                    raise RequestEntityTooLarge(
                        f"a task takes at most {limit} IDs (MAX_IDS_PER_TASK)"
                    )
                copy.write_row((submitted, user_id))
        cur.execute(
            "INSERT INTO task_ids (task_id, position, user_id) "
            "SELECT %s, row_number() OVER (ORDER BY first_position) - 1, user_id "
            "FROM (SELECT user_id, min(position) AS first_position "
            "      FROM staged_ids GROUP BY user_id) AS firsts",
            (task.id,),
        )
        distinct = cur.rowcount
        payload = None
        if distinct <= PAYLOAD_ECHO_MAX_IDS:
            cur.execute(
                "SELECT string_agg(user_id::text, ',' ORDER BY position) "
                "FROM task_ids WHERE task_id = %s",
                (task.id,),
            )
            payload = cur.fetchone()[0]
    task.total = distinct
    task.duplicates = submitted - distinct
    task.payload = payload
