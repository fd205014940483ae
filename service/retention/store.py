"""Retention's SQL, every statement in one place: a day's tasks, the marks of removed
IDs, and the slots and events that expire.

Statuses are bound as parameters. Each function runs in the session's transaction and
leaves it to its caller.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta

from sqlalchemy import text

from service.core.extensions import db
from service.core.models import FINISHED

# A day is the tasks created from its UTC midnight to the next.
LOCK_DAY_TASKS = text(
    "SELECT id, status = ANY(:finished) AND finished_at <= :cutoff AS expired FROM id_tasks "
    "WHERE date_created >= :start AND date_created < :end ORDER BY id FOR UPDATE"
)
MARK_REMOVED = text(
    "UPDATE id_tasks SET ids_removed_at = clock_timestamp() "
    "WHERE id = ANY(:ids) AND ids_removed_at IS NULL"
)
# The stored IDs of a task go with its rows: it can never be planned again.
DELETE_STORED_IDS = text("DELETE FROM task_id_chunks WHERE task_id = ANY(:ids)")
DELETE_SLOTS_BEFORE = text("DELETE FROM slots WHERE slot_start < :before")
DELETE_EVENTS_BEFORE = text("DELETE FROM limit_events WHERE finished_at < :before")


def midnight(day: date) -> datetime:
    """The day's start in UTC: the days of tasks and partitions are UTC days."""
    return datetime.combine(day, time(), tzinfo=UTC)


def lock_day_tasks(day: date, cutoff: datetime) -> dict[int, bool]:
    """The day's tasks, locked, and whether each finished by `cutoff`."""
    rows = db.session.execute(
        LOCK_DAY_TASKS,
        {
            "start": midnight(day),
            "end": midnight(day + timedelta(days=1)),
            "cutoff": cutoff,
            "finished": [str(status) for status in FINISHED],
        },
    ).all()
    return {task_id: bool(expired) for task_id, expired in rows}


def mark_removed(task_ids: list[int]) -> None:
    db.session.execute(MARK_REMOVED, {"ids": task_ids})
    db.session.execute(DELETE_STORED_IDS, {"ids": task_ids})


def delete_slots_before(before: datetime) -> int:
    return db.session.execute(DELETE_SLOTS_BEFORE, {"before": before}).rowcount


def delete_events_before(before: datetime) -> int:
    return db.session.execute(DELETE_EVENTS_BEFORE, {"before": before}).rowcount
