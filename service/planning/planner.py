"""The planner: which minute slot each ID goes to. Pure Python, no Flask, no database.

Two rules, applied to IDs in submission order over the open slots of a window:

1. fill: each ID goes to the earliest slot whose load is below RPM;
2. spread: once every slot is at or above RPM, each ID goes to the slot with the lowest
   load, the earliest one on a tie, so loads never differ by more than one.

`distribute` applies both (overflow "spread"); `fill` applies only the first and stops
when the window is full, leaving the remaining IDs for the next window (overflow "defer").
Both are lazy: one ID is taken from the input per pair yielded, and nothing is held but
the window's loads, so ten million IDs plan in the memory of ten.

The grid also tells, by arithmetic alone, whether IDs filling slots in time order would
go past the plan's horizon (`overreach`), from how many places its slots have taken.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import islice
from typing import TypeVar

T = TypeVar("T")

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def distribute(ids: Iterable[T], loads: list[int], rpm: int) -> Iterator[tuple[T, int]]:
    """Yield one `(id, index)` per ID: fill the slots up to `rpm`, then spread the rest.

    `loads` are the current loads of the window's open slots, oldest first; `index`
    points into it. The caller's list is not changed.
    """
    _check(loads, rpm)
    return _fill_then_spread(iter(ids), list(loads), rpm)


def fill(ids: Iterator[T], loads: list[int], rpm: int) -> Iterator[tuple[T, int]]:
    """Yield `(id, index)` pairs while a slot is below `rpm`; never beyond it.

    Takes an iterator and stops without taking another ID once every slot is full, so
    the caller can continue with the same iterator in the next window.
    """
    _check(loads, rpm)
    return _fill(ids, list(loads), rpm)


def fill_from(
    items: Iterable[T], bounds: Iterable[int], loads: list[int], rpm: int
) -> Iterator[tuple[T, int]]:
    """Yield `(item, index)` filling the slots in order up to `rpm`, as `fill` does, with
    each item placed no earlier than its bound (the index of the first slot it may take)
    and never before the item placed before it: the order is kept. Stops at the first
    item no slot is left for (it and those after it are not placed). The caller's list
    is not changed."""
    _check(loads, rpm)
    loads, index = list(loads), 0
    for item, bound in zip(items, bounds):
        index = max(index, bound)
        while index < len(loads) and loads[index] >= rpm:
            index += 1
        if index >= len(loads):
            return
        loads[index] += 1
        yield item, index


def _check(loads: list[int], rpm: int) -> None:
    if rpm < 1:
        raise ValueError(f"rpm must be at least 1, got {rpm}")
    if not loads:
        raise ValueError("there is no open slot to plan into")


def _fill_then_spread(ids: Iterator[T], loads: list[int], rpm: int) -> Iterator[tuple[T, int]]:
    yield from _fill(ids, loads, rpm)
    yield from _spread(ids, loads)


def _fill(ids: Iterator[T], loads: list[int], rpm: int) -> Iterator[tuple[T, int]]:
    """Fill in slot order. Loads only grow, so no earlier slot regains room."""
    for index, load in enumerate(loads):
        room = rpm - load
        if room <= 0:
            continue
        placed = 0
        # islice takes at most `room` IDs, so no ID is drawn without a slot for it.
        for placed, user_id in enumerate(islice(ids, room), start=1):  # noqa: B007
            yield user_id, index
        loads[index] += placed
        if placed < room:
            return  # the IDs ran out


def _spread(ids: Iterator[T], loads: list[int]) -> Iterator[tuple[T, int]]:
    """Round after round, one ID to each slot of the lowest load, in slot order.

    Serving every lowest slot in order is the same as choosing, ID by ID, the lowest
    slot with the earliest on a tie: each served slot rises above the ones still waiting.
    """
    while True:
        lowest = min(loads)
        round_slots = [index for index, load in enumerate(loads) if load == lowest]
        index = None
        # zip draws from round_slots first: when the round is over, no ID is drawn.
        for index, user_id in zip(round_slots, ids):
            yield user_id, index
        served = 0 if index is None else round_slots.index(index) + 1
        for served_index in round_slots[:served]:
            loads[served_index] += 1
        if served < len(round_slots):
            return


@dataclass(frozen=True)
class SlotGrid:
    """Time arithmetic of slots and windows, in aware UTC datetimes.

    Slots are `slot_seconds` long; windows are `window_slots` slots long and aligned to
    multiples of their length since the Unix epoch (with the defaults: the hour's four
    quarters). A slot is open while its start is more than `lead_seconds` ahead and, with
    a `horizon_seconds`, at most that far ahead: a plan never reaches past its horizon.
    """

    slot_seconds: int = 60
    window_slots: int = 15
    lead_seconds: float = 2.0
    horizon_seconds: float | None = None

    @property
    def slot_length(self) -> timedelta:
        return timedelta(seconds=self.slot_seconds)

    @property
    def window_length(self) -> timedelta:
        return self.slot_length * self.window_slots

    def slot_of(self, moment: datetime) -> datetime:
        return _floor(moment, self.slot_length)

    def window_of(self, moment: datetime) -> datetime:
        return _floor(moment, self.window_length)

    def span_of(self, moment: datetime, windows: int) -> datetime:
        """The start of the span of `windows` windows that holds `moment`, aligned as
        windows are (with the defaults, a span of four windows is the clock hour)."""
        return _floor(moment, self.window_length * windows)

    def next_window(self, window: datetime) -> datetime:
        return self.window_of(window) + self.window_length

    def slots_of_window(self, window: datetime) -> list[datetime]:
        start = self.window_of(window)
        return [start + i * self.slot_length for i in range(self.window_slots)]

    def is_open(self, slot: datetime, now: datetime, not_before: datetime | None = None) -> bool:
        """Starts more than the lead after `now`, by the horizon, and not before
        `not_before`: the lead is about the time left to write the plan, which a later
        start does not change."""
        ahead = (slot - _utc(now)).total_seconds()
        by_horizon = self.horizon_seconds is None or ahead <= self.horizon_seconds
        started = not_before is None or slot >= _utc(not_before)
        return self.lead_seconds < ahead and by_horizon and started

    def open_slots(
        self, window: datetime, now: datetime, not_before: datetime | None = None
    ) -> list[datetime]:
        return [
            slot for slot in self.slots_of_window(window) if self.is_open(slot, now, not_before)
        ]

    def target_window(self, now: datetime, not_before: datetime | None = None) -> datetime:
        """The window containing `now` (or `not_before`, if later) if it still has an open
        slot, else the next one."""
        start = max(_utc(now), _utc(not_before)) if not_before else now
        window = self.window_of(start)
        return window if self.open_slots(window, now, not_before) else self.next_window(window)

    def first_open_slot(self, now: datetime, not_before: datetime | None = None) -> datetime:
        """The earliest slot open at `now`, the horizon aside."""
        first = self.slot_of(_utc(now) + timedelta(seconds=self.lead_seconds)) + self.slot_length
        if not_before is None:
            return first
        start = self.slot_of(not_before)
        return max(first, start if start == _utc(not_before) else start + self.slot_length)

    def last_slot_by_horizon(self, now: datetime) -> datetime:
        """The last slot that starts by the horizon (the grid must have one)."""
        return self.slot_of(_utc(now) + timedelta(seconds=self.horizon_seconds))

    def spread_window(
        self, now: datetime, not_before: datetime | None, min_open: int
    ) -> datetime | None:
        """The window a spread task's overflow goes to: the first from the target window
        with `min_open` open slots (so always within two windows, unless the lead or the
        horizon cuts them); None when none starts by the horizon."""
        window = self.target_window(now, not_before)
        while window <= self.last_slot_by_horizon(now):
            if len(self.open_slots(window, now, not_before)) >= min_open:
                return window
            window = self.next_window(window)
        return None

    def open_span(self, now: datetime, not_before: datetime | None) -> tuple[datetime, datetime]:
        """The first slot open at `now` and the last by the horizon: every slot from one
        to the other is open (none is, when the first comes after the last)."""
        return self.first_open_slot(now, not_before), self.last_slot_by_horizon(now)

    def places_by_horizon(self, now: datetime, not_before: datetime | None, rpm: int) -> int:
        """The places below `rpm` of the slots open at `now` up to the horizon, were
        they empty."""
        return self.slots_between(*self.open_span(now, not_before)) * rpm

    def past_the_horizon(
        self, now: datetime, not_before: datetime | None, ids: int, rpm: int
    ) -> datetime:
        """The slot the last of `ids` IDs left over at the horizon would need, filling the
        slots after it up to `rpm`. They are counted empty, since no new plan reaches
        there: the slot named is the earliest that last ID could have."""
        first, last = self.open_span(now, not_before)
        after = max(first, last + self.slot_length)
        return after + (math.ceil(ids / rpm) - 1) * self.slot_length

    def slots_between(self, first: datetime, last: datetime) -> int:
        """How many slots start from `first` to `last`, both included."""
        return max(0, (last - first) // self.slot_length + 1)


@dataclass(frozen=True)
class Overreach:
    """A plan that goes past its horizon: how many of its IDs fit by it, and the slot its
    last ID would need."""

    fit: int
    last_slot: datetime


def overreach(
    grid: SlotGrid, now: datetime, not_before: datetime | None, ids: int, rpm: int, placed: int
) -> Overreach | None:
    """Whether `ids` IDs filling the open slots in time order, up to `rpm` each, go past
    the grid's horizon when `placed` of the places below RPM by it are taken already;
    None when they all fit."""
    free = max(0, grid.places_by_horizon(now, not_before, rpm) - placed)
    if ids <= free:
        return None
    return Overreach(free, grid.past_the_horizon(now, not_before, ids - free, rpm))


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("naive datetime: the planner works in aware UTC times only")
    return moment.astimezone(UTC)


def _floor(moment: datetime, length: timedelta) -> datetime:
    return EPOCH + ((_utc(moment) - EPOCH) // length) * length
