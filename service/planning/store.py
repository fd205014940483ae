"""Planning's SQL, every statement in one place: the database's clock, window locks,
slot loads and the places they have taken by the horizon, new assignments (COPY), rows
moved to other slots, and the rows that retries and resumes plan again.

Statuses are bound as parameters. Each function runs in the session's transaction
and leaves it to its caller.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime

from sqlalchemy import text

from service.core import locks
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
    "COPY assignments (task_id, position, user_id, limit_id, slot_start, status, task_day) "
    "FROM STDIN"
)
# A retried ID keeps its retry_at: a re-plan never moves it before that.
MOVE_TO_SLOT = text(
    "UPDATE assignments SET slot_start = :slot, status = :pending "
    "WHERE task_id = :task AND position = :position"
)
RETRIES_WAITING = text("SELECT EXISTS (SELECT 1 FROM assignments WHERE status = :retrying)")
RETRY_GROUPS = text(
    "SELECT DISTINCT task_id, retry_at FROM assignments WHERE status = :retrying "
    "ORDER BY task_id, retry_at"
)
LOCK_RETRY_GROUP = text(
    "SELECT position, user_id, refusals FROM assignments "
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
    """New rows (task_id, position, user_id, limit_id, slot, status, task_day), streamed
    into one COPY that PostgreSQL ingests while Python computes the next ones."""
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


def lock_retry_group(task_id: int, retry_at: datetime) -> list[tuple[int, int, int]]:
    """(position, user_id, refusals) of a task's IDs retrying at `retry_at`, their rows
    locked."""
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


# Re-plans (service/planning/replan.py), in the order a chunk runs them.
# Taken first by each chunk: one re-plan of a limit at a time, and an older one sees
# that a newer one took over only once the newer one's chunk has committed.
LOCK_REPLANS = text("SELECT pg_advisory_xact_lock(:ns, :limit)")
REPLAN_IS_CURRENT = text(
    "SELECT replan_event_id = :event FROM learned_rates WHERE limit_id = :limit"
)
# A limit's pending rows in open slots that this re-plan has not placed yet, in time
# order from a cursor (a range read of the index of pending rows by slot), each with the
# earliest moment it may run: its task's not_before, or its retry's retry_at.
# The task's not_before is a subquery, not a join: read for the rows taken only, it
# keeps the plan an index range read that stops at the LIMIT.
REPLAN_SOURCES = (
    "SELECT a.task_id, a.position, a.task_day, a.user_id, a.slot_start, greatest("
    "    (SELECT t.not_before FROM id_tasks AS t WHERE t.id = a.task_id), a.retry_at"
    "  ) AS earliest "
    "FROM assignments AS a "
    "WHERE a.limit_id = :limit AND a.status = :pending AND a.slot_start > :open_after "
    "  AND (a.slot_start, a.task_id, a.position) > (:after_slot, :after_task, :after_position) "
    "  AND a.replanned_in IS DISTINCT FROM :event {more} "
    "ORDER BY a.slot_start, a.task_id, a.position LIMIT :size"
)
LOCK_TASKS = text("SELECT id FROM id_tasks WHERE id = ANY(:ids) ORDER BY id FOR UPDATE")
# Each slot's load, and how much of it is pending IDs this re-plan will place after the
# chunk (they come later in time order, so they take no room yet).
REPLAN_ROOM = text(
    "SELECT s.slot_start, s.load, (SELECT count(*) FROM assignments AS a "
    "  WHERE a.limit_id = s.limit_id AND a.slot_start = s.slot_start "
    "    AND a.status = :pending AND a.replanned_in IS DISTINCT FROM :event "
    "    AND (a.slot_start, a.task_id, a.position) > (:after_slot, :after_task, :after_position)"
    "  ) AS later "
    "FROM slots AS s WHERE s.limit_id = :limit AND s.slot_start BETWEEN :first AND :last"
)
# Joined on the day too: each row is looked for in its own partition only.
REPLACE_ROWS = text(
    "UPDATE assignments AS a SET slot_start = to_timestamp(m.slot), replanned_in = :event "
    "FROM unnest(CAST(:tasks AS bigint[]), CAST(:positions AS int[]), "
    "  CAST(:days AS date[]), CAST(:slots AS bigint[])) AS m(task_id, position, task_day, slot) "
    "WHERE a.task_id = m.task_id AND a.position = m.position AND a.task_day = m.task_day"
)
# Loads moved from slot to slot, their rows locked in time order as planners do.
SHIFT_LOADS = text(
    "INSERT INTO slots AS s (limit_id, slot_start, load, replanned) "
    "SELECT :limit, to_timestamp(d.slot), d.n, d.n > 0 "
    "FROM unnest(CAST(:slots AS bigint[]), CAST(:deltas AS int[])) AS d(slot, n) "
    "ORDER BY d.slot "
    "ON CONFLICT (limit_id, slot_start) DO UPDATE SET load = s.load + EXCLUDED.load, "
    "  replanned = s.replanned OR EXCLUDED.replanned"
)
PUSH_LAST_SLOTS = text(
    "UPDATE id_tasks AS t SET last_slot = greatest(t.last_slot, to_timestamp(m.slot)) "
    "FROM unnest(CAST(:tasks AS bigint[]), CAST(:slots AS bigint[])) AS m(task_id, slot) "
    "WHERE t.id = m.task_id"
)
EVENT_MOVED = text("UPDATE limit_events SET moved = moved + :n WHERE id = :event")
EVENT_FINISHED = text("UPDATE limit_events SET finished_at = clock_timestamp() WHERE id = :event")
TASK_SPANS = text(
    "UPDATE id_tasks AS t SET first_slot = m.first, last_slot = m.last "
    "FROM (SELECT task_id, min(slot_start) AS first, max(slot_start) AS last "
    "      FROM assignments WHERE task_id = ANY(:ids) AND status <> :cancelled "
    "      GROUP BY task_id) AS m "
    "WHERE t.id = m.task_id"
)


def lock_replans(limit_id: int) -> None:
    db.session.execute(LOCK_REPLANS, {"ns": locks.REPLAN, "limit": limit_id})


def replan_is_current(limit_id: int, event_id: int) -> bool:
    return bool(db.session.scalar(REPLAN_IS_CURRENT, {"limit": limit_id, "event": event_id}))


def replan_sources(
    limit_id: int, event_id: int, open_after: datetime, after: tuple, size: int, **locked
) -> list:
    """Up to `size` (task_id, position, user_id, slot_start, earliest) rows to re-plan,
    after the cursor `after` (slot, task, position). With `tasks`, `first` and `last`
    (locked), only rows of those tasks from `first` to `last`, their rows locked."""
    more = ""
    if locked:
        more = "AND a.task_id = ANY(:tasks) AND a.slot_start BETWEEN :first AND :last"
    query = REPLAN_SOURCES.format(more=more) + (" FOR UPDATE OF a" if locked else "")
    params = {"limit": limit_id, "event": event_id, "open_after": open_after, "size": size}
    slot, task, position = after
    cursor = {"after_slot": slot, "after_task": task, "after_position": position}
    return db.session.execute(text(query), {**params, **cursor, **locked, **PENDING}).all()


def lock_tasks(task_ids: list[int]) -> None:
    db.session.execute(LOCK_TASKS, {"ids": sorted(task_ids)})


def replan_room(
    limit_id: int, event_id: int, first: datetime, last: datetime, after: tuple
) -> dict:
    """{slot: its load less the pending IDs the re-plan will place after the row `after`
    (slot, task, position)}, for the slots from `first` to `last`."""
    slot, task, position = after
    params = {"limit": limit_id, "event": event_id, "first": first, "last": last, **PENDING}
    cursor = {"after_slot": slot, "after_task": task, "after_position": position}
    rows = db.session.execute(REPLAN_ROOM, {**params, **cursor})
    return {row.slot_start: row.load - row.later for row in rows}


def replace_rows(event_id: int, moves: list[tuple[int, int, date, datetime]]) -> None:
    """Rows (task, position, task day) into new slots, marked as placed by the re-plan."""
    db.session.execute(
        REPLACE_ROWS,
        {
            "event": event_id,
            "tasks": [task for task, _, _, _ in moves],
            "positions": [position for _, position, _, _ in moves],
            "days": [day for _, _, day, _ in moves],
            "slots": [int(slot.timestamp()) for _, _, _, slot in moves],
        },
    )


def shift_loads(limit_id: int, deltas: dict[datetime, int]) -> None:
    """Add each delta (negative: taken out) to its slot's load; a slot that gains is
    marked re-planned."""
    slots = sorted(slot for slot, n in deltas.items() if n)
    if not slots:
        return
    db.session.execute(
        SHIFT_LOADS,
        {
            "limit": limit_id,
            "slots": [int(slot.timestamp()) for slot in slots],
            "deltas": [deltas[slot] for slot in slots],
        },
    )


def push_last_slots(latest: dict[int, datetime]) -> None:
    """Tasks' last slots moved on to at least these."""
    tasks = sorted(latest)
    slots = [int(latest[task].timestamp()) for task in tasks]
    db.session.execute(PUSH_LAST_SLOTS, {"tasks": tasks, "slots": slots})


def add_moved(event_id: int, count: int) -> None:
    db.session.execute(EVENT_MOVED, {"event": event_id, "n": count})


def finish_event(event_id: int) -> None:
    db.session.execute(EVENT_FINISHED, {"event": event_id})


def task_spans(task_ids: list[int]) -> None:
    """Tasks' first and last slots, read again from their rows."""
    params = {"ids": sorted(task_ids), "cancelled": AssignmentStatus.CANCELLED}
    db.session.execute(TASK_SPANS, params)
