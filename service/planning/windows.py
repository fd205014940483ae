"""Planning IDs into slots: the PostgreSQL side of the planner.

One transaction per task. It holds the task's row lock, a share lock on its limit's row
(a change of the limit's RPM waits for it), and an advisory lock per window of the
limit while planning into it, so any number of planners in any number of processes stay
correct: two never read the same slot's load at once. Each limit has windows, slots and
locks of its own, so two limits never share capacity nor wait for each other. Killed
half way, it leaves nothing behind, and the job re-run plans the task from the start.
Retries of failed IDs go through the same windows, locks and rules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime

from flask import current_app
from sqlalchemy import update

from service.core import locks
from service.core.errors import NotFound
from service.core.extensions import db
from service.core.models import UNPLANNED, AssignmentStatus, IdTask, Limit, Overflow, TaskStatus
from service.jobs import schedule_slots
from service.limits import store as limits
from service.limits.settings import shared
from service.planning import store
from service.planning.planner import EPOCH, distribute, fill
from service.planning.reading import slot_grid
from service.tasks.store import ID_CHUNKS, get_task, read_ids

# ((position, user_id), slot index) pairs and the window's open slots -> rows written.
Writer = Callable[[Iterator, list[datetime]], list[int]]


@dataclass(frozen=True)
class PlanOutcome:
    """What a planning job did; RQ keeps it as the job's result."""

    task_id: int
    planned: int = 0
    first_slot: datetime | None = None
    last_slot: datetime | None = None
    skipped: str | None = None  # why nothing was planned


def plan_stored_task(task_id: int, now: datetime | None = None) -> PlanOutcome:
    """Plan every ID of a received task, then schedule its slots' jobs.

    A task planned already is left as it is. `now` fixes the planning time (tests); by
    default the database's clock is read after each window lock is taken, so time spent
    waiting for a lock never plans into a slot that has started meanwhile.
    """
    _mark_planning(task_id)
    try:
        task = get_task(task_id, lock=True)
    except NotFound:
        return PlanOutcome(task_id, skipped="gone")
    if task.status not in UNPLANNED:
        db.session.rollback()
        return PlanOutcome(task_id, skipped=f"already {task.status}")
    planner = WindowPlanner(
        task.limit_id, task.overflow, now, expected_ids=task.total, not_before=task.not_before
    )
    # The IDs stream from a connection of their own, so that each window's rows go out
    # in one COPY that PostgreSQL ingests while Python computes the next ones. They are
    # committed and cannot change meanwhile: changing them takes the task row lock.
    with db.engine.connect() as reader:
        ids = read_ids(reader, ID_CHUNKS, task.id)
        planner.plan(ids, _copy_writer(task.id, task.limit_id))
    task.planned = planner.planned
    task.first_slot, task.last_slot = min(planner.used_slots), max(planner.used_slots)
    task.status = TaskStatus.SCHEDULED
    db.session.commit()
    schedule_slots(planner.limit.name, planner.used_slots)
    return PlanOutcome(task_id, planner.planned, task.first_slot, task.last_slot)


def _mark_planning(task_id: int) -> None:
    """Show `planning` at once, in a commit of its own."""
    db.session.execute(
        update(IdTask)
        .where(IdTask.id == task_id, IdTask.status == TaskStatus.RECEIVED)
        .values(status=TaskStatus.PLANNING)
    )
    db.session.commit()


def _copy_writer(task_id: int, limit_id: int) -> Writer:
    """New assignments, one COPY per window."""

    def write(pairs: Iterator, slots: list[datetime]) -> list[int]:
        counts = [0] * len(slots)
        slot_texts = [slot.isoformat() for slot in slots]
        pending = str(AssignmentStatus.PENDING)

        def rows() -> Iterator[tuple]:
            for (position, user_id), index in pairs:
                counts[index] += 1
                yield task_id, position, user_id, limit_id, slot_texts[index], pending

        store.copy_assignments(rows())
        return counts

    return write


class WindowPlanner:
    """Runs IDs through the generator window by window of one limit, from the target
    window on.

    A slot counts as open only if it starts after the plan is committed: the lead is
    PLAN_LEAD_SECONDS plus the time `expected_ids` take at PLANNING_RATE, so a big task
    never puts IDs into a slot that starts while its rows are still being written.
    With `not_before`, planning starts at the window holding it and never uses a slot
    that starts earlier; the lead still counts from now.
    """

    def __init__(
        self,
        limit_id: int,
        overflow: str,
        now: datetime | None,
        expected_ids: int = 0,
        not_before: datetime | None = None,
    ):
        values = self._settings()
        self.limit = self._limit(limit_id)
        grid = slot_grid(values)
        writing = expected_ids / current_app.config["PLANNING_RATE"]
        self.grid = replace(grid, lead_seconds=grid.lead_seconds + writing)
        self.rpm = self.limit.rpm
        self.spread_min_open_slots = values["SPREAD_MIN_OPEN_SLOTS"]
        self.overflow, self.fixed_now, self.not_before = overflow, now, not_before
        self.planned = 0
        self.used_slots: set[datetime] = set()

    def plan(self, ids: Iterator, write: Writer) -> None:
        window = self.grid.target_window(self._now(), self.not_before)
        while not self._plan_window(ids, window, write):
            window = self.grid.next_window(window)

    def _plan_window(self, ids: Iterator, window: datetime, write: Writer) -> bool:
        """Plan into one window; True once no ID is left for the next.

        Fill may use any open slot. The overflow is spread here only while enough
        slots are open (SPREAD_MIN_OPEN_SLOTS), so that a task is never crowded into
        the last minutes of a window; otherwise it moves on to the next window.
        """
        slots = self._open_slots(window)
        if not slots:
            return False
        loads = self._loads(slots)
        if self.overflow == Overflow.SPREAD and len(slots) >= self.spread_min_open_slots:
            self._add_loads(slots, write(distribute(ids, loads, self.rpm), slots))
            return True
        room = sum(max(0, self.rpm - load) for load in loads)
        # fill stops at a full window or at the last ID; fewer than room: the last.
        return self._add_loads(slots, write(fill(ids, loads, self.rpm), slots)) < room

    def _now(self) -> datetime:
        """The planning time: fixed (tests), else the database's clock."""
        return self.fixed_now if self.fixed_now is not None else store.database_now()

    def _settings(self) -> dict[str, int]:
        return shared(lock=True)  # a change of settings waits for this plan

    def _limit(self, limit_id: int) -> Limit:
        return limits.by_id(limit_id, limits.SHARE)  # so does a change of its RPM

    def _open_slots(self, window: datetime) -> list[datetime]:
        """The window's slots still open once it is locked."""
        self._lock(window)
        return self.grid.open_slots(window, self._now(), self.not_before)

    def _lock(self, window: datetime) -> None:
        number = (window - EPOCH) // self.grid.window_length
        store.lock_window(locks.window_key(self.limit.id, number))

    def _loads(self, slots: list[datetime]) -> list[int]:
        known = store.loads(self.limit.id, slots)
        return [known.get(slot, 0) for slot in slots]

    def _add_loads(self, slots: list[datetime], counts: list[int]) -> int:
        used = [(slot, n) for slot, n in zip(slots, counts) if n]
        if used:
            self._store_loads(used)
        written = sum(counts)
        self.planned += written
        self.used_slots.update(slot for slot, _ in used)
        return written

    def _store_loads(self, used: list[tuple[datetime, int]]) -> None:
        store.add_loads(self.limit.id, used)
