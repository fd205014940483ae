"""Re-planning a limit at its learned rate: the plan stays a true promise.

When a limit's learned rate changes (service/limits/rates.py), its pending IDs in slots
not yet started are planned again at the new capacity, by the usual fill rule, as a hard
cap whatever their tasks' overflow: in time order (slot, task, position), from the first
open slot on, never into a started slot, nor before an ID's earliest moment (its task's
not_before, its retry's retry_at). On a drop they move later, as fewer fit in a slot;
on a rise they may move earlier, into the capacity that opened.

It runs in bounded transactions, CHUNK_ROWS rows each, so that a limit with a million
pending IDs never holds its window locks for long. Each chunk takes the limit's re-plan
lock (one re-plan of a limit at a time), then, in the order every planner takes them,
its tasks' rows, the settings, the limit's row, the windows from its first slot to its
last, then its rows, and places them after those of the chunk before; the slots ahead
still hold the IDs not placed yet, which take no room in the sums (they come later in
time order and are placed in turn).
A chunk killed half way leaves nothing; the rows placed carry the event's id, so a
re-run goes on where it stopped. A newer change of the rate stops an older re-plan: the
newer one places every row again. Tasks' last slots follow as it goes (a drop moves them
later), and their first and last slots are read again from their rows at the end.
"""

from __future__ import annotations

import logging
import math
import time
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

from service.core import locks
from service.core.extensions import db
from service.jobs import schedule_slots
from service.limits import store as limits
from service.limits.learning import capacity
from service.limits.settings import shared
from service.planning import store
from service.planning.horizon import planning_grid
from service.planning.planner import EPOCH, SlotGrid, fill_from

log = logging.getLogger(__name__)

# Rows one transaction places at most.
CHUNK_ROWS = 2000
# Windows one transaction locks at most: a chunk of a low rate places fewer rows.
CHUNK_WINDOWS = 40


@dataclass
class Replan:
    """How a re-plan went: IDs moved, transactions, the longest one in seconds."""

    limit_id: int
    event_id: int
    moved: int = 0
    placed: int = 0
    transactions: int = 0
    longest_seconds: float = 0.0
    superseded: bool = False
    tasks: set[int] = field(default_factory=set)


@dataclass
class _Cursor:
    """Where the re-plan stands: the last row placed (time order), and the slot after
    which the next rows go, with what it holds of them."""

    after: tuple = (EPOCH, 0, -1)
    target: datetime | None = None


def replan_limit(limit_id: int, event_id: int, now: datetime | None = None) -> Replan:
    """Place every pending ID of the limit in a slot not yet started again at its
    capacity; `now` fixes the clock (tests)."""
    outcome, cursor = Replan(limit_id, event_id), _Cursor()
    name = limits.name_of(limit_id)
    db.session.commit()
    if name is None:  # deleted meanwhile: none of its IDs waits
        return outcome
    while True:
        began = time.monotonic()
        chunk = _place_chunk(outcome, cursor, now)
        outcome.transactions += 1
        outcome.longest_seconds = max(outcome.longest_seconds, time.monotonic() - began)
        if chunk is None:
            break
        schedule_slots(name, chunk, now)
    _finish(outcome)
    log.info(
        "limit %s: re-plan %d %s: %d IDs placed, %d moved, %d transactions, longest %.3f s",
        name,
        event_id,
        "stopped for a newer one" if outcome.superseded else "done",
        outcome.placed,
        outcome.moved,
        outcome.transactions,
        outcome.longest_seconds,
        extra={"fields": {"limit": name, "event": event_id, "moved": outcome.moved}},
    )
    return outcome


def _place_chunk(outcome: Replan, cursor: _Cursor, now: datetime | None) -> set[datetime] | None:
    """One transaction: the next rows placed; returns the slots they went to, or None
    once none is left (or a newer re-plan took over)."""
    limit_id, event_id = outcome.limit_id, outcome.event_id
    store.lock_replans(limit_id)
    if not store.replan_is_current(limit_id, event_id):
        outcome.superseded = True
        db.session.rollback()
        return None
    rate = limits.learned(limit_id)
    cap = capacity(rate.rpm, rate.learned_rpm)
    grid = planning_grid(shared(), CHUNK_ROWS, None)
    moment = now or store.database_now()
    open_after = grid.first_open_slot(moment) - grid.slot_length
    target = max(cursor.target or open_after, open_after)
    size = min(CHUNK_ROWS, cap * grid.window_slots * (CHUNK_WINDOWS - 1))
    peeked = store.replan_sources(limit_id, event_id, open_after, cursor.after, size)
    if not peeked:
        db.session.rollback()
        return None
    tasks = sorted({row.task_id for row in peeked})
    first = min(peeked[0].slot_start, target + grid.slot_length)
    last = _last_slot_held(grid, target, peeked, cap)
    # In the order every planner takes them: tasks, settings, the limit, windows.
    store.lock_tasks(tasks)
    shared(lock=True)
    limits.by_id(limit_id, limits.SHARE)
    _lock_windows(grid, limit_id, first, last)
    rows = store.replan_sources(
        limit_id, event_id, open_after, cursor.after, size, tasks=tasks, first=first, last=last
    )
    moves = _targets(grid, outcome, rows, target, last, cap, moment)
    if not moves:  # the slots held were full: the next chunk looks further on
        db.session.rollback()
        cursor.target = last
        return set()
    _write(outcome, cursor, moves, grid.slot_length)
    db.session.commit()
    return {slot for _, slot in moves}


def _last_slot_held(grid: SlotGrid, target: datetime, rows: list, cap: int) -> datetime:
    """The last slot a chunk locks: past its rows' own, and far enough after `target`
    for all of them at `cap`, one slot spare; at most CHUNK_WINDOWS windows on."""
    needed = target + (math.ceil(len(rows) / cap) + 1) * grid.slot_length
    farthest = grid.window_of(target) + CHUNK_WINDOWS * grid.window_length - grid.slot_length
    return min(max(needed, rows[-1].slot_start), max(farthest, rows[-1].slot_start))


def _lock_windows(grid: SlotGrid, limit_id: int, first: datetime, last: datetime) -> None:
    window, keys = grid.window_of(first), []
    while window <= last:
        keys.append(locks.window_key(limit_id, (window - EPOCH) // grid.window_length))
        window = grid.next_window(window)
    store.lock_windows(keys)


def _targets(grid, outcome: Replan, rows, target, last, cap, now) -> list[tuple]:
    """(row, slot) for the rows that fit, in order, filling the open slots after
    `target` up to `last` at `cap`, none before its earliest moment (its task's
    not_before, its retry's retry_at)."""
    slots = []
    slot = target + grid.slot_length
    while slot <= last:
        if grid.is_open(slot, now):
            slots.append(slot)
        slot += grid.slot_length
    if not slots or not rows:
        return []
    after = (rows[-1].slot_start, rows[-1].task_id, rows[-1].position)
    held = store.replan_room(outcome.limit_id, outcome.event_id, slots[0], slots[-1], after)
    own = Counter(row.slot_start for row in rows)  # they are moving: no room taken
    loads = [max(0, held.get(slot, 0) - own[slot]) for slot in slots]
    bounds = [_first_index(slots, row.earliest) for row in rows]
    return [(row, slots[index]) for row, index in fill_from(rows, bounds, loads, cap)]


def _first_index(slots: list[datetime], earliest: datetime | None) -> int:
    """The first of the slots that starts at `earliest` or later (past the last when
    none does)."""
    if earliest is None:
        return 0
    return bisect_left(slots, earliest)


def _write(outcome: Replan, cursor: _Cursor, moves: list[tuple], slot_length) -> None:
    deltas: Counter = Counter()
    latest: dict[int, datetime] = {}
    moved = 0
    for row, slot in moves:
        if row.slot_start != slot:
            deltas[row.slot_start] -= 1
            deltas[slot] += 1
            moved += 1
        latest[row.task_id] = max(latest.get(row.task_id, slot), slot)
    store.replace_rows(
        outcome.event_id, [(r.task_id, r.position, r.task_day, slot) for r, slot in moves]
    )
    store.shift_loads(outcome.limit_id, deltas)
    store.push_last_slots(latest)
    store.add_moved(outcome.event_id, moved)
    last_row, last_slot = moves[-1]
    cursor.after = (last_row.slot_start, last_row.task_id, last_row.position)
    # The slot of the last row placed may take more: the next chunk starts there.
    cursor.target = last_slot - slot_length
    outcome.moved += moved
    outcome.placed += len(moves)
    outcome.tasks |= set(latest)


def _finish(outcome: Replan) -> None:
    """The tasks' first and last slots as their rows now say, and the event ended
    (unless a newer one took over)."""
    if outcome.tasks:
        store.lock_tasks(sorted(outcome.tasks))
        store.task_spans(sorted(outcome.tasks))
    if not outcome.superseded:
        store.finish_event(outcome.event_id)
    db.session.commit()
