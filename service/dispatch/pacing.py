"""Pacing: each ID of a slot is handed to the processor at its own turn.

A slot's IDs are due one `step` apart, `step` being the slot over its load, so they
spread evenly through the slot and on across its end into the next one: a strict
limiter downstream sees the same gap between any two calls. The turns are reserved in
PostgreSQL as IDs are claimed, in one sequence per limit (`learned_rates.next_turn_at`),
so several workers sharing a slot take turns one after another, two slots of a limit
never run at once, and a slot that starts late, or gets IDs back from a dead worker,
goes on at the same step from the moment it resumes: never as a burst.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

T = TypeVar("T")

# Pacing spreads a slot's IDs over this share of it. The whole of it: with less, the
# calls inside a slot come faster than the slot's rate, which a strict limiter refuses.
PACE_SHARE = 1.0
# IDs whose turns fall within this many seconds are handed out together (one check of
# their claims); a per-ID processor still starts each call at its own turn.
PACING_TICK_SECONDS = 0.05
# A slot whose next turn is further behind the clock than this restarts its turns from
# now - this: a late slot catches up at most this much at once.
CATCH_UP_SECONDS = 0.25
# Waits are cut into slices of this, so that a stop request is seen soon.
WAIT_SLICE_SECONDS = 0.2


@dataclass(frozen=True)
class Clock:
    """Wall-clock time and sleeping, injectable so that tests can drive pacing."""

    seconds: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep

    def wait_until(
        self,
        moment: float,
        stopping: Callable[[], bool] = lambda: False,
        meanwhile: Callable[[], object] = lambda: None,
    ) -> None:
        """Sleep until `moment` in slices, calling `meanwhile` before each (a slot job
        records the calls that ended while it waits for the next turn)."""
        while not stopping():
            left = moment - self.seconds()
            if left <= 0:
                return
            meanwhile()
            self.sleep(min(left, WAIT_SLICE_SECONDS))

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.seconds(), UTC)


SYSTEM_CLOCK = Clock()


def step_of(slot_seconds: int, load: int) -> float:
    """Seconds between two turns of a slot holding `load` IDs."""
    return slot_seconds * PACE_SHARE / max(1, load)


def paced_groups(
    items: Sequence[T],
    first_turn: float,
    step: float,
    clock: Clock,
    stopping: Callable[[], bool],
    meanwhile: Callable[[], object] = lambda: None,
    lead: float = 0.0,
    tick: float = PACING_TICK_SECONDS,
) -> Iterator[tuple[float, list[T]]]:
    """Yield the items in groups, each `lead` seconds before its first member's turn,
    with that turn (the caller can tell how far behind it runs).

    Item k's turn is `first_turn + k * step`; members whose turns fall within `tick` of
    the group's first go with it. Stops early on a stop request. `meanwhile` is called
    while waiting for a turn.
    """
    index = 0
    while index < len(items) and not stopping():
        turn = first_turn + index * step
        clock.wait_until(turn - lead, stopping, meanwhile)
        if stopping():
            return
        handed_until = clock.seconds() + lead + tick
        end = index + 1
        while end < len(items) and first_turn + end * step <= handed_until:
            end += 1
        yield turn, list(items[index:end])
        index = end
