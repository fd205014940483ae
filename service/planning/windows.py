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

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, datetime

from sqlalchemy import func, update

from service.core import locks, partitions
from service.core.errors import NotFound
from service.core.extensions import db
from service.core.models import UNPLANNED, AssignmentStatus, IdTask, Limit, Overflow, TaskStatus
from service.jobs import schedule_slots
from service.limits import store as limits
from service.limits.settings import shared
from service.planning import store
from service.planning.horizon import PastTheHorizon, horizon_days, planning_grid
from service.planning.planner import EPOCH, Overreach, distribute, fill
from service.tasks.store import ID_CHUNKS, get_task, read_ids

# ((position, user_id), slot index) pairs and the open slots planned into -> rows written.
Writer = Callable[[Iterator, list[datetime]], list[int]]
# IDs filled in time order take at most this many windows per round trip (their locks,
# loads, COPY and new loads), so a long plan costs a few statements, not a few a window.
MAX_SPAN_WINDOWS = 1000


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
    waiting for a lock never plans into a slot that has started meanwhile. A task that
    would go past the horizon (other tasks took the capacity it was admitted with) is
    refused: nothing of its plan stays, and its `error` says why.
    """
    _mark_planning(task_id)
    try:
        task = get_task(task_id, lock=True)
    except NotFound:
        return PlanOutcome(task_id, skipped="gone")
    if task.status not in UNPLANNED:
        db.session.rollback()
        return PlanOutcome(task_id, skipped=f"already {task.status}")
    # Made ahead by the scheduler; made here when the scheduler was away.
    partitions.ensure_day(task.day)
    planner = WindowPlanner(
        task.limit_id,
        task.overflow,
        now,
        expected_ids=task.total,
        not_before=task.not_before,
        horizon_days=horizon_days(),
    )
    try:
        # Undone alone on a refusal, so that the task's row lock holds until it is marked.
        with db.session.begin_nested():
            _plan_ids(task, planner)
    except PastTheHorizon as refusal:
        return _refuse(task, refusal)
    task.planned = planner.planned
    task.first_slot, task.last_slot = min(planner.used_slots), max(planner.used_slots)
    task.status = TaskStatus.SCHEDULED
    db.session.commit()
    schedule_slots(planner.limit.name, planner.used_slots, now)
    return PlanOutcome(task_id, planner.planned, task.first_slot, task.last_slot)


def _plan_ids(task: IdTask, planner: WindowPlanner) -> None:
    # The IDs stream from a connection of their own, so that each window's rows go out
    # in one COPY that PostgreSQL ingests while Python computes the next ones. They are
    # committed and cannot change meanwhile: changing them takes the task row lock.
    with db.engine.connect() as reader:
        ids = read_ids(reader, ID_CHUNKS, task.id)
        planner.plan(ids, _copy_writer(task.id, task.limit_id, task.day))


def _refuse(task: IdTask, refusal: PastTheHorizon) -> PlanOutcome:
    task.status = TaskStatus.REFUSED
    task.error = f"not planned: {refusal.message}"
    task.finished_at = func.now()
    db.session.commit()
    return PlanOutcome(task.id, skipped=task.error)


def _mark_planning(task_id: int) -> None:
    """Show `planning` at once, in a commit of its own."""
    db.session.execute(
        update(IdTask)
        .where(IdTask.id == task_id, IdTask.status == TaskStatus.RECEIVED)
        .values(status=TaskStatus.PLANNING)
    )
    db.session.commit()


def _copy_writer(task_id: int, limit_id: int, day: date) -> Writer:
    """New assignments, one COPY per window, into the partition of the task's day."""

    def write(pairs: Iterator, slots: list[datetime]) -> list[int]:
        counts = [0] * len(slots)
        slot_texts = [slot.isoformat() for slot in slots]
        pending = str(AssignmentStatus.PENDING)
        day_text = day.isoformat()

        def rows() -> Iterator[tuple]:
            for (position, user_id), index in pairs:
                counts[index] += 1
                yield task_id, position, user_id, limit_id, slot_texts[index], pending, day_text

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
    that starts earlier; the lead still counts from now. With `horizon_days`, no slot
    starting later than that after now is open, and IDs left over there raise
    PastTheHorizon.
    """

    def __init__(
        self,
        limit_id: int,
        overflow: str,
        now: datetime | None,
        expected_ids: int = 0,
        not_before: datetime | None = None,
        horizon_days: int | None = None,
    ):
        """`overflow` is the task's, or DEFER for IDs re-planned after a refusal (the
        slot capacity is then a hard cap)."""
        values = self._settings()
        self.limit = self._limit(limit_id)
        self.grid = planning_grid(values, expected_ids, horizon_days)
        self.horizon_days = horizon_days
        # The learned rate, when the downstream has refused more than it takes.
        self.rpm = limits.slot_capacity(self.limit)
        self.spread_min_open_slots = values["SPREAD_MIN_OPEN_SLOTS"]
        self.overflow, self.fixed_now, self.not_before = overflow, now, not_before
        self.expected_ids = expected_ids
        self.planned = 0
        self.used_slots: set[datetime] = set()

    def plan(self, ids: Iterator, write: Writer) -> None:
        started = self._now()
        window = self.grid.target_window(started, self.not_before)
        while self._may_plan_into(window, started):
            span = self._span(window, started)
            if self._plan_span(ids, span, write):
                return
            window = self.grid.next_window(span[-1])

    def _may_plan_into(self, window: datetime, started: datetime) -> bool:
        """Whether `window` starts by the horizon. Past it, IDs left over (with a horizon,
        `expected_ids` counts them all) raise PastTheHorizon; with none left, the plan is
        done (the last ones filled the last places)."""
        if self.grid.horizon_seconds is None or window <= self._horizon_slot(started):
            return True
        if self.planned < self.expected_ids:
            raise self._past_the_horizon(started)
        return False

    def _horizon_slot(self, started: datetime) -> datetime | None:
        if self.grid.horizon_seconds is None:
            return None
        return self.grid.last_slot_by_horizon(started)

    def _span(self, window: datetime, started: datetime) -> list[datetime]:
        """The windows to plan into next, from `window` on: one; or, for IDs that fill
        slots in time order (overflow defer), as many as the IDs left would fill if the
        slots were empty, up to MAX_SPAN_WINDOWS and the horizon."""
        last = self._horizon_slot(started)
        if self.overflow == Overflow.SPREAD:
            return [window]
        per_window = self.rpm * self.grid.window_slots
        wanted = min(MAX_SPAN_WINDOWS, math.ceil((self.expected_ids - self.planned) / per_window))
        span = [window]
        while len(span) < wanted:
            following = self.grid.next_window(span[-1])
            if last is not None and following > last:
                break
            span.append(following)
        return span

    def _past_the_horizon(self, started: datetime) -> PastTheHorizon:
        left = max(1, self.expected_ids - self.planned)
        last_slot = self.grid.past_the_horizon(started, self.not_before, left, self.rpm)
        reach = Overreach(self.planned, last_slot)
        return PastTheHorizon(reach, self.expected_ids, self.not_before, started, self.horizon_days)

    def _plan_span(self, ids: Iterator, span: list[datetime], write: Writer) -> bool:
        """Plan into the open slots of the span's windows; True once no ID is left for
        the next ones.

        Fill may use any open slot. The overflow is spread here (a span of one window)
        only while enough slots are open (SPREAD_MIN_OPEN_SLOTS), so that a task is never
        crowded into the last minutes of a window; otherwise it moves on to the next.
        """
        slots = self._open_slots(span)
        if not slots:
            return False
        loads = self._loads(slots)
        if self.overflow == Overflow.SPREAD and len(slots) >= self.spread_min_open_slots:
            self._add_loads(slots, write(distribute(ids, loads, self.rpm), slots))
            return True
        room = sum(max(0, self.rpm - load) for load in loads)
        # fill stops at full slots or at the last ID; fewer than room: the last.
        return self._add_loads(slots, write(fill(ids, loads, self.rpm), slots)) < room

    def _now(self) -> datetime:
        """The planning time: fixed (tests), else the database's clock."""
        return self.fixed_now if self.fixed_now is not None else store.database_now()

    def _settings(self) -> dict[str, int]:
        return shared(lock=True)  # a change of settings waits for this plan

    def _limit(self, limit_id: int) -> Limit:
        return limits.by_id(limit_id, limits.SHARE)  # so does a change of its RPM

    def _open_slots(self, span: list[datetime]) -> list[datetime]:
        """The span's slots still open once its windows are locked."""
        self._lock(span)
        now = self._now()
        return [
            slot for window in span for slot in self.grid.open_slots(window, now, self.not_before)
        ]

    def _lock(self, span: list[datetime]) -> None:
        numbers = [(window - EPOCH) // self.grid.window_length for window in span]
        store.lock_windows([locks.window_key(self.limit.id, number) for number in numbers])

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
