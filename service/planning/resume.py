"""Changing a limit: its RPM, processor and options, and pausing and resuming it.

`paused` is a field of the limit like the others, so one PATCH may change a limit's RPM
and resume it, in one transaction. A paused limit's slot jobs claim nothing: its IDs stay
pending and its slots pass. Tasks are still planned into it, so their plan stays known.
Resuming plans every pending ID whose slot is no longer open again, from the moment of
resuming and by the usual rules, as if its tasks had brought those IDs then (in task
order): a resume never becomes a burst. IDs in slots still open keep them.

The flag and the plan change together: a resume that dies half way leaves the limit
paused and its plan as it was, and resuming again does the whole of it. Resuming a
limit that runs changes nothing.

A held limit (service/limits/held.py) is let go the same way once it is allowed: by a
change of its options, or by `release` when this process's settings allow it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import groupby

from flask import current_app
from sqlalchemy import select

from service.core.extensions import db
from service.core.models import IdTask, Limit
from service.jobs import enqueue_replan, schedule_ahead, schedule_slots
from service.limits import held, rates
from service.limits import services as limit_services
from service.limits import store as limits
from service.limits.store import subtract_loads
from service.planning import store
from service.planning.reading import slot_grid
from service.planning.retries import replan_in_place
from service.planning.store import database_now


def pause(name: str) -> None:
    """Stop a limit's slots from running; IDs a slot job has claimed already finish."""
    change_limit(name, {"paused": True})


def release(name: str, now: datetime | None = None) -> int:
    """Let a limit found held go, now that this process's settings allow it: its IDs
    whose slot passed meanwhile are planned again from now, as a resume plans them;
    returns how many."""
    return change_limit(name, {}, now).replanned


def resume(name: str, now: datetime | None = None) -> int:
    """Let a paused limit's slots run again; returns how many IDs whose slot had
    passed were planned again (none, for a limit that was not paused)."""
    return change_limit(name, {"paused": False}, now).replanned


def replace_limit(name: str, fields: dict) -> dict:
    """PUT: every writable field given (the schema requires them): nothing is reset to a
    default because a client left it out."""
    return update_limit(name, fields)


def update_limit(name: str, changes: dict, now: datetime | None = None) -> dict:
    return limit_services.answer(change_limit(name, changes, now).limit)


@dataclass(frozen=True)
class LimitChange:
    """A limit as changed, and how many of its IDs a resume planned again."""

    limit: Limit
    replanned: int = 0


def change_limit(name: str, changes: dict, now: datetime | None = None) -> LimitChange:
    """Change a limit's fields, pausing or resuming it; the slots a resume planned into
    get their jobs once it has committed.

    A held limit (service/limits/held.py) that runs after the change (its new options
    are allowed, or the settings allow it now) is let go as a resume lets a paused one
    go: its overdue IDs are planned again from now."""
    before = limits.get_limit(name)
    resuming = changes.get("paused") is False or held.was_held(before)
    # Task rows are locked before the limit's row, in the order the retry planner takes them.
    overdue = _lock_overdue_tasks(before.id, now) if resuming else None
    limit = limits.get_limit(name, limits.CHANGE)
    stopped = limit.paused or held.was_held(limit)
    limit_services.change_fields(limit, changes)
    runs = not changes.get("paused", limit.paused) and held.reason_of(limit) is None
    replanned, slots = 0, set()
    if overdue is not None and stopped and runs:
        replanned, slots = _replan_overdue(limit, overdue, now)
        slots |= _pending_within_reach(limit.id, overdue.cutoff)
    if "paused" in changes:
        limit.paused = changes["paused"]
    if runs:
        limit.held_since = None
    reset = _reset_learned(limit, changes)
    db.session.commit()
    schedule_slots(limit.name, slots, now)
    if reset is not None:
        enqueue_replan(limit.id, reset.event_id)
    return LimitChange(limit, replanned)


def _reset_learned(limit: Limit, changes: dict):
    """`learned_rpm: null`, or adaptation switched off: the learned rate back at rpm
    (an event whose re-plan may move IDs earlier)."""
    if "learned_rpm" in changes:
        return rates.reset(limit.id, limit.rpm, "reset by the operator")
    if changes.get("adaptive") is False:
        return rates.reset(limit.id, limit.rpm, "adaptation switched off")
    return None


def _pending_within_reach(limit_id: int, since: datetime) -> set[datetime]:
    """The slots after `since` holding pending IDs that rq-scheduler should hold jobs
    for: reconcile skipped them while the limit was paused, and the next run may come
    too late for the first of them."""
    grid = slot_grid()
    start = grid.slot_of(since)
    count = schedule_ahead() // grid.slot_length + 1
    near = [start + number * grid.slot_length for number in range(count)]
    return limits.slots_with_pending_ids(limit_id, near)


@dataclass(frozen=True)
class _Overdue:
    """The tasks that hold a limit's pending IDs in slots starting by `cutoff` (no
    longer open), their rows locked."""

    cutoff: datetime
    tasks: list[IdTask]


def _lock_overdue_tasks(limit_id: int, now: datetime | None) -> _Overdue:
    lead = timedelta(seconds=current_app.config["PLAN_LEAD_SECONDS"])
    cutoff = (now or database_now()) + lead
    task_ids = store.overdue_task_ids(limit_id, cutoff)
    tasks = db.session.scalars(
        select(IdTask)
        .where(IdTask.id.in_(task_ids))
        .order_by(IdTask.id)
        .with_for_update(of=IdTask)
        .execution_options(populate_existing=True)
    ).all()
    return _Overdue(cutoff, list(tasks))


def _replan_overdue(
    limit: Limit, overdue: _Overdue, now: datetime | None
) -> tuple[int, set[datetime]]:
    """Move the overdue IDs out of their slots and plan them again from now, task by
    task; returns how many, and the slots they went to."""
    rows = store.lock_overdue_rows(limit.id, overdue.cutoff, [task.id for task in overdue.tasks])
    if not rows:
        return 0, set()
    subtract_loads(Counter((limit.id, row.slot_start) for row in rows))
    by_task = {task.id: task for task in overdue.tasks}
    slots: set[datetime] = set()
    for task_id, task_rows in groupby(rows, key=lambda row: row.task_id):
        task = by_task[task_id]
        positions = [(row.position, row.user_id) for row in task_rows]
        # Each task's lead counts every row: none is committed before the last is written.
        planner = replan_in_place(task, positions, None, now=now, expected_ids=len(rows))
        slots |= planner.used_slots
        task.first_slot = store.first_slot(task_id)
    return len(rows), slots
