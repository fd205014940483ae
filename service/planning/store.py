"""Planning's SQL, every statement in one place: the database's clock, window locks,
slot loads and the places they have taken by the horizon, new assignments (COPY), rows
moved to other slots, and the rows that retries and resumes plan again.

Statuses are bound as parameters. Each function runs in the session's transaction
and leaves it to its caller.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

from sqlalchemy import text

from service.core.extensions import db, raw_connection
from service.core.models import AssignmentStatus

PENDING = {"pending": AssignmentStatus.PENDING}
RETRYING = {"retrying": AssignmentStatus.RETRYING}

NOW = text("SELECT clock_timestamp()")
# In the keys' order, which is the windows' time order.
LOCK_WINDOWS = text(
    "SELECT count(pg_advisory_xact_lock(key)) FROM unnest(CAST(:keys AS bigint[])) AS key"
)
# A range read of the slots' key: an array of every slot would cost more to send than
# the read itself, for the thousands of slots of a long plan.
LOADS = text(
    "SELECT slot_start, load FROM slots "
    "WHERE limit_id = :limit AND slot_start BETWEEN :first AND :last"
)
# The places below RPM that a limit's slots from :first to :last have taken.
PLACED = text(
    "SELECT coalesce(sum(least(load, :rpm)), 0) FROM slots "
    "WHERE limit_id = :limit AND slot_start BETWEEN :first AND :last"
)
# Slots by their start in whole seconds since the epoch: integers travel faster than
# timestamps, which counts for the thousands of slots of a long plan.
ADD_LOADS = text(
    "INSERT INTO slots (limit_id, slot_start, load) "
    "SELECT :limit, to_timestamp(u.start), u.load "
    "FROM unnest(CAST(:starts AS bigint[]), CAST(:loads AS int[])) AS u(start, load) "
    "ON CONFLICT (limit_id, slot_start) DO UPDATE SET load = slots.load + EXCLUDED.load"
)
# COPY needs psycopg's own cursor: the one statement here in its style.
COPY_ASSIGNMENTS = (
    "COPY assignments (task_id, position, user_id, limit_id, slot_start, status) FROM STDIN"
)
MOVE_TO_SLOT = text(
    "UPDATE assignments SET slot_start = :slot, status = :pending, retry_at = NULL "
    "WHERE task_id = :task AND position = :position"
)
RETRIES_WAITING = text("SELECT EXISTS (SELECT 1 FROM assignments WHERE status = :retrying)")
RETRY_GROUPS = text(
    "SELECT DISTINCT task_id, retry_at FROM assignments WHERE status = :retrying "
    "ORDER BY task_id, retry_at"
)
LOCK_RETRY_GROUP = text(
    "SELECT position, user_id FROM assignments "
    "WHERE task_id = :task AND status = :retrying AND retry_at = :retry_at "
    "ORDER BY position FOR UPDATE"
)
# A limit's pending rows whose slot starts by :cutoff: no longer open.
OVERDUE = "limit_id = :limit AND status = :pending AND slot_start <= :cutoff"
OVERDUE_TASKS = text(f"SELECT DISTINCT task_id FROM assignments WHERE {OVERDUE}")
LOCK_OVERDUE_ROWS = text(
    "SELECT task_id, position, user_id, slot_start FROM assignments "
    f"WHERE {OVERDUE} AND task_id = ANY(:tasks) "
    "ORDER BY task_id, position FOR UPDATE"
)
FIRST_SLOT = text(
    "SELECT min(slot_start) FROM assignments WHERE task_id = :task AND status <> :cancelled"
)


def database_now() -> datetime:
    """The database's clock, the same for every process on every machine."""
    return db.session.execute(NOW).scalar().astimezone(UTC)


def lock_windows(keys: list[int]) -> None:
    """Until the transaction ends, in one round trip; `keys` are `locks.window_key`s in
    time order."""
    db.session.execute(LOCK_WINDOWS, {"keys": keys})


def placed_below_rpm(limit_id: int, first: datetime, last: datetime, rpm: int) -> int:
    """How many places below `rpm` the limit's slots from `first` to `last` hold taken:
    a slot's load, or `rpm` for a slot above it. One range read of the slots' key."""
    return db.session.scalar(PLACED, {"limit": limit_id, "first": first, "last": last, "rpm": rpm})


def loads(limit_id: int, slots: list[datetime]) -> dict[datetime, int]:
    """The loads of the slots from the first of `slots` to the last that hold any."""
    params = {"limit": limit_id, "first": slots[0], "last": slots[-1]}
    return dict(db.session.execute(LOADS, params).all())


def add_loads(limit_id: int, used: list[tuple[datetime, int]]) -> None:
    """Add to the loads of slots, which start at whole seconds."""
    db.session.execute(
        ADD_LOADS,
        {
            "limit": limit_id,
            "starts": [int(slot.timestamp()) for slot, _ in used],
            "loads": [n for _, n in used],
        },
    )


def copy_assignments(rows: Iterator[tuple]) -> None:
    """New rows (task_id, position, user_id, limit_id, slot, status), streamed into one
    COPY that PostgreSQL ingests while Python computes the next ones."""
    with raw_connection().cursor() as cur, cur.copy(COPY_ASSIGNMENTS) as copy:
        write_row = copy.write_row
        for row in rows:
            write_row(row)


def move_to_slots(task_id: int, moves: list[tuple[int, datetime]]) -> None:
    """Rows of a task, by position, pending again in new slots."""
    db.session.execute(
        MOVE_TO_SLOT,
        [
            {"task": task_id, "position": position, "slot": slot, **PENDING}
            for position, slot in moves
        ],
    )


def retries_waiting() -> bool:
    return db.session.execute(RETRIES_WAITING, RETRYING).scalar()


def retry_groups() -> list:
    """(task_id, retry_at) of the retrying IDs, in the order they are planned."""
    return db.session.execute(RETRY_GROUPS, RETRYING).all()


def lock_retry_group(task_id: int, retry_at: datetime) -> list[tuple[int, int]]:
    """(position, user_id) of a task's IDs retrying at `retry_at`, their rows locked."""
    rows = db.session.execute(
        LOCK_RETRY_GROUP, {"task": task_id, "retry_at": retry_at, **RETRYING}
    ).all()
    return [tuple(row) for row in rows]


def overdue_task_ids(limit_id: int, cutoff: datetime) -> list[int]:
    return db.session.scalars(OVERDUE_TASKS, {"limit": limit_id, "cutoff": cutoff, **PENDING}).all()


def lock_overdue_rows(limit_id: int, cutoff: datetime, task_ids: list[int]) -> list:
    """(task_id, position, user_id, slot_start) of the overdue rows of those tasks,
    locked in task and position order."""
    return db.session.execute(
        LOCK_OVERDUE_ROWS, {"limit": limit_id, "cutoff": cutoff, "tasks": task_ids, **PENDING}
    ).all()


def first_slot(task_id: int) -> datetime | None:
    """Where the task's first IDs now are: moved ones no longer hold their old slot."""
    return db.session.scalar(FIRST_SLOT, {"task": task_id, "cancelled": AssignmentStatus.CANCELLED})
