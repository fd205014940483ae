"""What the plan page shows: the current and the next hour of slots, each slot's load
against RPM with its outcomes, the slot jobs that rq-scheduler holds, and one slot's
IDs a page at a time."""

from __future__ import annotations

import math
from datetime import UTC, datetime

from redis.exceptions import RedisError
from sqlalchemy import func, or_, select
from werkzeug.exceptions import NotFound

from service.core.extensions import db
from service.core.models import Assignment, AssignmentStatus, Slot
from service.jobs import scheduled_jobs
from service.limits import store as limits
from service.planning.planner import SlotGrid
from service.planning.reading import plan_between, slot_grid

# An hour of the page is 60 slots in whole windows: with one-minute slots the clock
# hour, with the seconds-long slots of tests a span they run through in minutes.
HOUR_SLOTS = 60
HOURS_SHOWN = 2
JOBS_SHOWN = 50
IDS_PER_PAGE = 100
# Loads up to RPM are drawn in this many shades; above RPM in a colour of its own.
SHADES = 4


def current_plan(now: datetime | None = None, limit_name: str | None = None) -> dict:
    """A limit's current and next hour as windows of slots (default: the default
    limit's), and the upcoming slot jobs."""
    now = now or datetime.now(UTC)
    grid = slot_grid()
    per_hour = math.ceil(HOUR_SLOTS / grid.window_slots)
    start = grid.span_of(now, per_hour)
    end = start + HOURS_SHOWN * per_hour * grid.window_length
    plan = plan_between(start, end, now=now, limit_name=limit_name)
    limit = limits.find(plan["limit"])
    waiting = _waiting_by_slot(limit.id, start, end)
    current = grid.slot_of(now)
    windows = [
        {
            **window,
            "slots": [
                _cell(slot, plan["rpm"], waiting.get(slot["start"], 0), current)
                for slot in window["slots"]
            ],
        }
        for window in plan["windows"]
    ]
    hours = [
        {"start": hour[0]["start"], "end": hour[-1]["end"], "windows": hour}
        for hour in (windows[i : i + per_hour] for i in range(0, len(windows), per_hour))
    ]
    return {
        "now": now,
        "limit": plan["limit"],
        "limits": limits.all_names(),
        "rpm": plan["rpm"],
        "paused": plan["paused"],
        "slot_seconds": grid.slot_seconds,
        "window_slots": grid.window_slots,
        "hours": hours,
        "time_format": _time_format(grid),
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
        "ids": ids,
        "total": total,
        "first": (page - 1) * IDS_PER_PAGE + 1,
        "page": page,
        "pages": pages,
        "time_format": _time_format(grid),
    }


def _cell(slot: dict, rpm: int, pending: int, current: datetime) -> dict:
    load = slot["load"]
    return {
        **slot,
        "pending": pending,
        "over": load > rpm,
        "shade": min(SHADES, math.ceil(SHADES * load / rpm)),
        "now": slot["start"] == current,
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
