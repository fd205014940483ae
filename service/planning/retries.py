"""Retries and re-plans: IDs already in their rows (retrying ones, or pending ones whose
slot passed) planned again through the same windows, locks and rules as a task.

Recording an outcome only marks an ID `retrying` with the moment it may run again
(`retry_at`), which never waits for a window lock that the planner of a big task may
hold for seconds; a job of its own (`workers.planning.plan_retries`, on the planning
queue) then plans the retrying IDs here.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime

from service.core.extensions import db
from service.core.models import IdTask, Overflow, TaskStatus
from service.jobs import schedule_slots
from service.planning import store
from service.planning.windows import WindowPlanner
from service.tasks.store import cancel_retrying, get_task


def plan_retries() -> int:
    """Plan every retrying ID into a slot; returns how many were planned.

    One transaction per task and retry moment, so window locks rise in time within each,
    as a planner's do.
    """
    groups = store.retry_groups()
    db.session.commit()
    planned, slots = 0, defaultdict(set)
    for task_id, retry_at in groups:
        count, limit_name, used = _plan_group(task_id, retry_at)
        planned += count
        slots[limit_name] |= used
    for limit_name, used in slots.items():
        schedule_slots(limit_name, used)
    return planned


def _plan_group(task_id: int, retry_at: datetime) -> tuple[int, str | None, set[datetime]]:
    task = get_task(task_id, lock=True)
    rows = store.lock_retry_group(task_id, retry_at)
    if task.status == TaskStatus.CANCELLED:
        cancel_retrying(task_id)
        rows = []
    if not rows:
        db.session.commit()
        return 0, None, set()
    # IDs the downstream refused are planned under its capacity, whatever the task's
    # overflow: spreading them above it would only be refused again.
    refused = any(refusals for _, _, refusals in rows)
    overflow = Overflow.DEFER if refused else task.overflow
    positions = [(position, user_id) for position, user_id, _ in rows]
    planner = replan_in_place(task, positions, retry_at, overflow=overflow)
    db.session.commit()
    return len(rows), planner.limit.name, planner.used_slots


def replan_in_place(
    task: IdTask,
    positions: list[tuple[int, int]],
    not_before: datetime | None,
    now: datetime | None = None,
    expected_ids: int | None = None,
    overflow: str | None = None,
) -> WindowPlanner:
    """Plan IDs of a task that are still in their rows (retrying ones, or pending ones
    whose slot passed) into its limit's slots from `not_before` on (or from now, if that
    has passed); the task's last slot follows. `now` and `expected_ids` are the
    planner's (default: the database's clock, and the IDs given); `overflow`, the
    task's unless given.

    Called with the task's row lock held; the planner tells the slots used, to be
    scheduled once the transaction commits.
    """

    def write(pairs: Iterator, slots: list[datetime]) -> list[int]:
        counts = [0] * len(slots)
        moves = []
        for (position, _user_id), index in pairs:
            moves.append((position, slots[index]))
            counts[index] += 1
        if moves:
            store.move_to_slots(task.id, moves)
        return counts

    planner = WindowPlanner(
        task.limit_id,
        overflow or task.overflow,
        now,
        expected_ids=expected_ids or len(positions),
        not_before=not_before,
    )
    planner.plan(iter(positions), write)
    used = planner.used_slots
    task.last_slot = max([task.last_slot, *used]) if task.last_slot else max(used)
    return planner
