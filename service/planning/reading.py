"""Slots: the grid of the deployment's slots and windows, each limit's slot loads, and a
limit's plan as it is read back, slot by slot, grouped by window. Every limit has slots
of its own on the same grid. Then what the plan pages read besides: a task's slots and
failures, the tasks planned into a span, a limit's latest failures, every limit's load
now and the end of its backlog."""

from __future__ import annotations

from datetime import UTC, datetime

from flask import current_app
from sqlalchemy import func, select, text
from sqlalchemy.orm import defer

from service.core.extensions import db
from service.core.models import Assignment, AssignmentStatus, IdTask, Limit, Slot
from service.limits.settings import shared
from service.limits.store import named_by_request, slot_capacity
from service.planning.planner import SlotGrid

# One answer shows at most a day of one-minute slots.
MAX_SLOTS_SHOWN = 1440
DEFAULT_WINDOWS_SHOWN = 4


def slot_grid(values: dict[str, int] | None = None) -> SlotGrid:
    """The deployment's slots (from its shared `values`, read if not given)."""
    values = values or shared()
    return SlotGrid(
        values["SLOT_SECONDS"], values["WINDOW_SLOTS"], current_app.config["PLAN_LEAD_SECONDS"]
    )


def plan_between(
    start: datetime | None,
    end: datetime | None,
    windows: int = DEFAULT_WINDOWS_SHOWN,
    now: datetime | None = None,
    limit_name: str | None = None,
) -> dict:
    """A limit's slots (default: the default limit's) from `start`'s window to `end`
    (default: `windows` windows later), as they stand at `now` (default: the clock's),
    each against the limit's slot capacity: its learned rate, never above its rpm."""
    limit = named_by_request(limit_name)
    grid = slot_grid()
    now = now or datetime.now(UTC)
    start = grid.window_of(start or now)
    # A range ending before it starts is empty; a long one is cut: the client asks again
    # from the last slot shown.
    end = min(
        end or start + windows * grid.window_length, start + MAX_SLOTS_SHOWN * grid.slot_length
    )
    capacity = slot_capacity(limit)
    stored = {
        slot.slot_start: slot
        for slot in db.session.scalars(
            select(Slot).where(
                Slot.limit_id == limit.id, Slot.slot_start >= start, Slot.slot_start < end
            )
        )
    }
    windows = []
    window = start
    while window < end:
        slots = [
            _slot(moment, stored.get(moment), capacity, grid.is_open(moment, now))
            for moment in grid.slots_of_window(window)
            if moment < end
        ]
        windows.append(
            {
                "start": window,
                "end": grid.next_window(window),
                "load": sum(slot["load"] for slot in slots),
                "capacity": sum(slot["capacity"] for slot in slots),
                "slots": slots,
            }
        )
        window = grid.next_window(window)
    return {
        "limit": limit.name,
        "paused": limit.paused,
        "rpm": limit.rpm,
        "learned_rpm": capacity,
        "slot_seconds": grid.slot_seconds,
        "window_slots": grid.window_slots,
        "now": now,
        "windows": windows,
    }


def _slot(moment: datetime, stored: Slot | None, capacity: int, is_open: bool) -> dict:
    return {
        "start": moment,
        "load": stored.load if stored else 0,
        "capacity": capacity,
        "done": stored.done if stored else 0,
        "failed": stored.failed if stored else 0,
        "open": is_open,
        "started_at": stored.started_at if stored else None,
        "late": stored.late if stored else False,
        "replanned": stored.replanned if stored else False,
    }


def ids_by_slot(
    limit_id: int, start: datetime, end: datetime, per_slot: int
) -> dict[datetime, list[int]]:
    """The first `per_slot` IDs planned into each of a limit's slots of [start, end), in
    plan order."""
    rows = db.session.execute(
        text(
            "SELECT slot_start, user_id FROM ("
            "  SELECT slot_start, user_id, row_number() OVER ("
            "    PARTITION BY slot_start ORDER BY task_id, position) AS rank"
            "  FROM assignments"
            "  WHERE limit_id = :limit AND slot_start >= :start AND slot_start < :end"
            "    AND status <> :cancelled"
            ") AS ranked WHERE rank <= :per_slot ORDER BY slot_start, rank"
        ),
        {
            "limit": limit_id,
            "start": start,
            "end": end,
            "per_slot": per_slot,
            "cancelled": AssignmentStatus.CANCELLED,
        },
    )
    listed: dict[datetime, list[int]] = {}
    for slot_start, user_id in rows:
        listed.setdefault(slot_start, []).append(user_id)
    return listed


def task_slots(task_id: int, count: int) -> tuple[list, int]:
    """The first `count` slots holding a task's IDs (those not cancelled), each with
    how many of them it holds and how many are done and failed, and the slots in all."""
    rows = db.session.execute(
        text(
            "SELECT slot_start, count(*) AS ids,"
            "  count(*) FILTER (WHERE status = :done) AS done,"
            "  count(*) FILTER (WHERE status = :failed) AS failed,"
            "  count(*) OVER () AS slots "
            "FROM assignments WHERE task_id = :task AND status <> :cancelled "
            "GROUP BY slot_start ORDER BY slot_start LIMIT :count"
        ),
        {
            "task": task_id,
            "count": count,
            "done": AssignmentStatus.DONE,
            "failed": AssignmentStatus.FAILED,
            "cancelled": AssignmentStatus.CANCELLED,
        },
    ).all()
    return rows, rows[0].slots if rows else 0


def task_failures(task_id: int, offset: int, count: int, newest: bool) -> list[Assignment]:
    """A page of a task's IDs that failed for good, the latest first or in task order."""
    order = (
        (Assignment.finished_at.desc(), Assignment.position.desc())
        if newest
        else (Assignment.position,)
    )
    return db.session.scalars(
        select(Assignment)
        .where(Assignment.task_id == task_id, Assignment.status == AssignmentStatus.FAILED)
        .order_by(*order)
        .offset(offset)
        .limit(count)
    ).all()


def last_finished(task_ids: list[int]) -> dict[int, datetime]:
    """When each task's last ID finished."""
    rows = db.session.execute(
        select(Assignment.task_id, func.max(Assignment.finished_at))
        .where(Assignment.task_id.in_(task_ids))
        .group_by(Assignment.task_id)
    )
    return {task_id: finished for task_id, finished in rows if finished is not None}


def tasks_between(limit_id: int, start: datetime, end: datetime, count: int) -> list[IdTask]:
    """The first `count` of a limit's tasks planned into [start, end), by first slot:
    those whose span from first to last slot meets it (read from the tasks alone, so
    cheap whatever the IDs in those slots)."""
    return db.session.scalars(
        select(IdTask)
        .options(defer(IdTask.payload))
        .where(IdTask.limit_id == limit_id, IdTask.first_slot < end, IdTask.last_slot >= start)
        .order_by(IdTask.first_slot, IdTask.id)
        .limit(count)
    ).all()


def task_slots_between(task_id: int, start: datetime, end: datetime) -> set[datetime]:
    """The slots of [start, end) holding IDs of the task (not cancelled)."""
    return set(
        db.session.scalars(
            select(Assignment.slot_start)
            .distinct()
            .where(
                Assignment.task_id == task_id,
                Assignment.slot_start >= start,
                Assignment.slot_start < end,
                Assignment.status != AssignmentStatus.CANCELLED,
            )
        )
    )


def recent_failures(limit_id: int, count: int) -> list:
    """A limit's last `count` IDs that failed for good, the latest first, with their
    task's name."""
    # Through the tasks that counted a failure: the IDs of the others are never read.
    failing = select(IdTask.id).where(IdTask.limit_id == limit_id, IdTask.failed > 0)
    return db.session.execute(
        select(Assignment, IdTask.task_name)
        .join(IdTask, IdTask.id == Assignment.task_id)
        .where(Assignment.task_id.in_(failing), Assignment.status == AssignmentStatus.FAILED)
        .order_by(Assignment.finished_at.desc(), Assignment.task_id.desc(), Assignment.position)
        .limit(count)
    ).all()


def limits_by_name() -> list[Limit]:
    return db.session.scalars(select(Limit).order_by(Limit.name)).all()


def loads_at(slot: datetime) -> dict[int, int]:
    """Each limit's load in the slot starting at `slot`, for the limits that have it."""
    rows = db.session.execute(select(Slot.limit_id, Slot.load).where(Slot.slot_start == slot))
    return dict(rows.all())


def backlog_ends(limit_ids: list[int]) -> dict[int, datetime]:
    """The last slot holding pending IDs of each limit that has some."""
    # One backward probe of the pending IDs' index per limit.
    rows = db.session.execute(
        text(
            "SELECT l.id, (SELECT max(a.slot_start) FROM assignments AS a"
            "  WHERE a.limit_id = l.id AND a.status = :pending) "
            "FROM limits AS l WHERE l.id = ANY(:ids)"
        ),
        {"ids": limit_ids, "pending": AssignmentStatus.PENDING},
    )
    return {limit_id: last for limit_id, last in rows if last is not None}
