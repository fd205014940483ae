"""What the plan pages show: the current and the next hour of slots, each slot's load
against its capacity (the learned rate, at most RPM) with its outcomes, the tasks
planned into them, the latest failures and the slot jobs that rq-scheduler holds; every
limit at a glance; one slot's IDs a page at a time; one task's progress, slots, finish
and failures."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

from redis.exceptions import RedisError
from sqlalchemy import func, or_, select
from werkzeug.exceptions import NotFound

from service.core.extensions import db
from service.core.models import Assignment, AssignmentStatus, IdTask, Limit, Slot, TaskStatus
from service.jobs import scheduled_jobs
from service.limits import learning
from service.limits import store as limits
from service.limits.held import reason_of
from service.planning import reading
from service.planning.planner import SlotGrid
from service.planning.reading import plan_between, slot_grid
from service.tasks import store as tasks

# An hour of the page is 60 slots in whole windows: with one-minute slots the clock
# hour, with the seconds-long slots of tests a span they run through in minutes.
HOUR_SLOTS = 60
HOURS_SHOWN = 2
JOBS_SHOWN = 50
IDS_PER_PAGE = 100
# Loads up to the capacity are drawn in this many shades; above it in a colour of its own.
SHADES = 4
FAILURES_PER_PAGE = 50
# The plan page lists this many of the tasks in its two hours, and of the latest failures.
TASKS_SHOWN = 50
FAILURES_SHOWN = 20
# A task of a million IDs uses thousands of slots; its page lists the first ones.
TASK_SLOTS_SHOWN = 120
# A task's failures, the latest first, or in the order of the task's IDs.
NEWEST = "newest"
FAILURE_ORDERS = (NEWEST, "position")


def current_plan(
    now: datetime | None = None, limit_name: str | None = None, task_id: int | None = None
) -> dict:
    """A limit's current and next hour as windows of slots (default: the default
    limit's), the tasks planned into them, the limit's latest failures and the upcoming
    slot jobs; the slots holding IDs of task `task_id`, if one is given, are marked."""
    now = now or datetime.now(UTC)
    grid = slot_grid()
    per_hour = math.ceil(HOUR_SLOTS / grid.window_slots)
    start = grid.span_of(now, per_hour)
    end = start + HOURS_SHOWN * per_hour * grid.window_length
    plan = plan_between(start, end, now=now, limit_name=limit_name)
    limit = limits.find(plan["limit"])
    marked = reading.task_slots_between(task_id, start, end) if task_id else set()
    windows = _windows(plan, _waiting_by_slot(limit.id, start, end), marked, grid.slot_of(now))
    return {
        "now": now,
        "limit": plan["limit"],
        "limits": limits.all_names(),
        "rpm": plan["rpm"],
        "learned_rpm": plan["learned_rpm"],
        "adaptive": limit.adaptive,
        "held": _held(limit),
        "paused": plan["paused"],
        "slot_seconds": grid.slot_seconds,
        "window_slots": grid.window_slots,
        "hours": _hours(windows, per_hour),
        "columns": _column_labels(grid),
        "time_format": _time_format(grid),
        "tasks": _tasks_between(limit.id, start, end, grid, now),
        "marked": {"task_id": task_id, "slots": len(marked)},
        "failures": reading.recent_failures(limit.id, FAILURES_SHOWN),
        "jobs": _upcoming_jobs(),
    }


def slot_ids(slot: datetime, page: int, limit_name: str | None = None) -> dict:
    """One slot's counts and a page of its IDs (those not cancelled) in plan order."""
    limit = limits.get_limit(limit_name or limits.DEFAULT)
    grid = slot_grid()
    if grid.slot_of(slot) != slot:
        raise NotFound(
            f"{slot.isoformat()} is not the start of a slot: slots are {grid.slot_seconds} s"
        )
    listed = (
        Assignment.limit_id == limit.id,
        Assignment.slot_start == slot,
        Assignment.status != AssignmentStatus.CANCELLED,
    )
    total = db.session.scalar(select(func.count()).select_from(Assignment).where(*listed))
    pages = max(1, math.ceil(total / IDS_PER_PAGE))
    if page > pages:
        raise NotFound(f"the slot's IDs fill {pages} page(s), not {page}")
    ids = db.session.scalars(
        select(Assignment)
        .where(*listed)
        .order_by(Assignment.task_id, Assignment.position)
        .offset((page - 1) * IDS_PER_PAGE)
        .limit(IDS_PER_PAGE)
    ).all()
    return {
        "slot": slot,
        "limit": limit.name,
        "stored": db.session.get(Slot, (limit.id, slot)),
        "rpm": limit.rpm,
        "capacity": limits.slot_capacity(limit),
        "ids": ids,
        "total": total,
        "first": (page - 1) * IDS_PER_PAGE + 1,
        "page": page,
        "pages": pages,
        "time_format": _time_format(grid),
    }


def limits_overview(now: datetime | None = None) -> dict:
    """Every limit: its RPM and learned rate, whether paused, the current slot's load,
    its IDs pending and where its backlog ends."""
    now = now or datetime.now(UTC)
    grid = slot_grid()
    limits.find(limits.DEFAULT)  # recorded the first time it is needed, as everywhere
    shown = reading.limits_by_name()
    ids = [limit.id for limit in shown]
    current = grid.slot_of(now)
    loads, counts = reading.loads_at(current), limits.counts(ids)
    ends = reading.backlog_ends(ids)
    learned = limits.learned_rates(ids)
    return {
        "now": now,
        "current": current,
        "time_format": _time_format(grid),
        "limits": [
            {
                "limit": limit,
                "load": loads.get(limit.id, 0),
                "capacity": _capacity(limit, learned.get(limit.id)),
                **counts.get(limit.id, {"pending": 0, "done": 0, "failed": 0}),
                "backlog": _backlog(ends.get(limit.id), grid, now),
            }
            for limit in shown
        ],
    }


def _capacity(limit: Limit, learned) -> int:
    return learning.capacity(limit.rpm, learned.learned_rpm if learned else None)


def _held(limit: Limit) -> dict | None:
    """Why the limit's slots are held, under this process's settings or (`since`) as
    another process found them."""
    why = reason_of(limit)
    if why is None and limit.held_since is None:
        return None
    return {"reason": why, "since": limit.held_since}


def _backlog(last_slot: datetime | None, grid: SlotGrid, now: datetime) -> dict | None:
    if last_slot is None:
        return None
    end = last_slot + grid.slot_length
    # A backlog that should have ended: slot jobs lost, workers away, the limit paused.
    overdue = end < now
    return {"last_slot": last_slot, "end": end, "left": _in_words(end - now), "overdue": overdue}


def _in_words(span: timedelta) -> str:
    """A span as a person reads it: in 1 h 5 min, in 40 s, 3 min ago."""
    seconds = round(abs(span.total_seconds()))
    hours, minutes = seconds // 3600, seconds % 3600 // 60
    if hours:
        words = f"{hours} h {minutes} min" if minutes else f"{hours} h"
    else:
        words = f"{minutes} min" if minutes else f"{seconds} s"
    return f"in {words}" if span.total_seconds() >= 0 else f"{words} ago"


def task_page(task_id: int, page: int, order: str, now: datetime | None = None) -> dict:
    """A task's progress, its estimated finish, the slots it uses and a page of its
    failures (`order` one of FAILURE_ORDERS)."""
    now = now or datetime.now(UTC)
    task = tasks.get_task(task_id)
    pages = max(1, math.ceil(task.failed / FAILURES_PER_PAGE))
    if page > pages:
        raise NotFound(f"the task's failures fill {pages} page(s), not {page}")
    grid = slot_grid()
    slots, slot_count = reading.task_slots(task.id, TASK_SLOTS_SHOWN)
    offset = (page - 1) * FAILURES_PER_PAGE
    return {
        "now": now,
        "task": task,
        "limit": task.limit_name,
        "progress": progress(task),
        "finish": finish(task, grid, _last_finished([task]).get(task.id), now),
        "slots": [_task_slot(slot, grid.slot_of(now)) for slot in slots],
        "slot_count": slot_count,
        "failures": reading.task_failures(task.id, offset, FAILURES_PER_PAGE, order == NEWEST),
        "first": offset + 1,
        "page": page,
        "pages": pages,
        "order": order,
        "time_format": _time_format(grid),
    }


def progress(task: IdTask) -> dict:
    """A task's IDs as parts of a bar: done, failed, pending (not finished: waiting for
    planning, a slot, a retry, or running) and, once cancelled, those that never ran."""
    counts = {"done": task.done, "failed": task.failed, "pending": task.pending}
    if task.status == TaskStatus.CANCELLED:
        counts["cancelled"] = task.total - task.done - task.failed
    total = task.total or 1
    return {
        "total": task.total,
        "counts": counts,
        "parts": [
            {"name": name, "count": count, "percent": round(100 * count / total, 2)}
            for name, count in counts.items()
            if count
        ],
    }


def finish(task: IdTask, grid: SlotGrid, last_finished: datetime | None, now: datetime) -> dict:
    """When a task ends: the end of its last slot while any of its IDs waits (which a
    paused limit or a slot run late pushes back), else when its last ID finished."""
    if task.status == TaskStatus.CANCELLED:
        return {"state": "cancelled", "at": last_finished}
    if task.status == TaskStatus.REFUSED:
        return {"state": "refused", "at": None}
    if not task.pending:
        return {"state": "finished", "at": last_finished}
    if task.last_slot is None:
        return {"state": "unplanned", "at": None}
    end = task.last_slot + grid.slot_length
    if task.limit and task.limit.paused:
        return {"state": "paused", "at": end}
    return {"state": "overdue" if end < now else "expected", "at": end}


def _last_finished(shown: list[IdTask]) -> dict[int, datetime]:
    # Only a finished task's end is read from its IDs: a running one's is its plan's.
    finished = [task.id for task in shown if not task.pending]
    return reading.last_finished(finished) if finished else {}


def _task_slot(row, current: datetime) -> dict:
    return {
        "start": row.slot_start,
        "ids": row.ids,
        "done": row.done,
        "failed": row.failed,
        "pending": row.ids - row.done - row.failed,
        "past": row.slot_start < current,
        "now": row.slot_start == current,
    }


def _windows(plan: dict, waiting: dict, marked: set, current: datetime) -> list[dict]:
    return [
        {
            **window,
            "slots": [
                _cell(slot, waiting.get(slot["start"], 0), current, marked)
                for slot in window["slots"]
            ],
        }
        for window in plan["windows"]
    ]


def _hours(windows: list[dict], per_hour: int) -> list[dict]:
    return [
        {"start": hour[0]["start"], "end": hour[-1]["end"], "windows": hour}
        for hour in (windows[i : i + per_hour] for i in range(0, len(windows), per_hour))
    ]


def _column_labels(grid: SlotGrid) -> list[str]:
    """Each column's time from its row's start: minutes, or seconds for shorter slots."""
    offsets = [i * grid.slot_seconds for i in range(grid.window_slots)]
    if grid.slot_seconds % 60 == 0:
        return [f"+{offset // 60}" for offset in offsets]
    return [f"+{offset}s" for offset in offsets]


def _tasks_between(
    limit_id: int, start: datetime, end: datetime, grid: SlotGrid, now: datetime
) -> dict:
    # One more than shown, to tell whether there are more.
    found = reading.tasks_between(limit_id, start, end, TASKS_SHOWN + 1)
    shown = found[:TASKS_SHOWN]
    last = _last_finished(shown)
    return {
        "shown": [
            {
                "task": task,
                "progress": progress(task),
                "finish": finish(task, grid, last.get(task.id), now),
            }
            for task in shown
        ],
        "more": len(found) > TASKS_SHOWN,
    }


def _cell(slot: dict, pending: int, current: datetime, marked: set) -> dict:
    load, capacity = slot["load"], slot["capacity"]
    return {
        **slot,
        "pending": pending,
        "over": load > capacity,
        "shade": min(SHADES, math.ceil(SHADES * load / capacity)),
        "now": slot["start"] == current,
        "past": slot["start"] < current,
        "marked": slot["start"] in marked,
    }


def _waiting_by_slot(limit_id: int, start: datetime, end: datetime) -> dict[datetime, int]:
    """IDs of each slot that have not finished: pending, or running under a claim."""
    # Each status on its own, so that each is read from its partial index.
    waiting = or_(
        Assignment.status == AssignmentStatus.PENDING,
        Assignment.status == AssignmentStatus.RUNNING,
    )
    rows = db.session.execute(
        select(Assignment.slot_start, func.count())
        .where(
            Assignment.limit_id == limit_id,
            Assignment.slot_start >= start,
            Assignment.slot_start < end,
            waiting,
        )
        .group_by(Assignment.slot_start)
    )
    return dict(rows.all())


def _upcoming_jobs() -> dict:
    # PostgreSQL holds the plan; a page without Redis still shows it.
    try:
        jobs, total = scheduled_jobs(JOBS_SHOWN)
    except RedisError as error:
        return {"shown": [], "total": 0, "error": str(error)}
    return {"shown": jobs, "total": total, "error": None}


def _time_format(grid: SlotGrid) -> str:
    return "%H:%M" if grid.slot_seconds % 60 == 0 else "%H:%M:%S"
