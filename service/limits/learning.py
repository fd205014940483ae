"""Learned rates: what a limit's downstream takes, as its refusals have shown.

A limit's `rpm` is what the operator believes the downstream takes; the downstream says
better, by refusing calls (HTTP 429 or 503, or a processor's `Refused`). Each limit keeps
a learned rate beside its `rpm`, in PostgreSQL, so that every process plans and paces by
the same one:

- it starts at `rpm` (stored as null);
- refusals lower it, at most once per slot (a burst of refusals counts once), to the
  lower of LOWER_TO of the rate and what the downstream accepted over the last slot's
  length, as the slot job that met the refusals saw it (when it had run half a slot),
  never below MOST_LOWERED of it in one step;
- after QUIET_SLOTS slots without a refusal (and without a change) it rises by
  RISE_SHARE of `rpm` (at least 1), never above `rpm`: probing back up costs a few
  refusals at most, and a rate lowered too far comes back within a minute or so of
  slots;
- the operator may reset it to `rpm`, or switch adaptation off for a limit (`adaptive`):
  refusals are then only retried after their Retry-After.

Each change is an event (`limit_events`) that re-plans the limit's IDs in the slots not
yet started (service/planning/replan.py). The arithmetic is here, pure; the statements
are in service/limits/store.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

LOWER_TO = 0.7
# One lowering takes the rate down to this share of it at most.
MOST_LOWERED = 0.5
QUIET_SLOTS = 3
RISE_SHARE = 0.1
# A refusal without a (usable) Retry-After waits one slot; none waits longer than this.
MAX_REFUSAL_WAIT_SECONDS = 3600.0

LOWERED, RAISED, RESET = "lowered", "raised", "reset"


def capacity(rpm: int, learned_rpm: int | None) -> int:
    """The slot capacity planning uses: the learned rate, never above `rpm`."""
    return rpm if learned_rpm is None else min(rpm, learned_rpm)


def lowered(current: int, accepted: float | None) -> int:
    """The rate after refusals: LOWER_TO of the current one, or what the downstream
    accepted if that is lower, but never below half the current one in one step (what
    a slot job saw accepted is its own calls only, while others of the limit ran too);
    at least 1."""
    target = math.floor(current * LOWER_TO)
    if accepted is not None:
        target = max(min(target, math.floor(accepted)), math.ceil(current * MOST_LOWERED))
    return max(1, target)


def raised(current: int, rpm: int) -> int:
    """The rate after a quiet period: one step up, at most `rpm`."""
    return min(rpm, current + max(1, round(rpm * RISE_SHARE)))


def quiet_period(slot_seconds: int) -> timedelta:
    return timedelta(seconds=QUIET_SLOTS * slot_seconds)


def seen_accepting(ends: list[float], now: float, since: float, slot_seconds: int):
    """What a slot job saw the downstream accept over the last slot's length: its calls
    that succeeded ending in it (`ends`, times in seconds), counted over a whole slot
    when it has run less than that since `since`; None before half a slot."""
    seen = min(now - since, float(slot_seconds))
    if seen < slot_seconds / 2:
        return None
    recent = sum(1 for end in ends if end > now - slot_seconds)
    return recent * slot_seconds / seen


def refusal_wait(retry_after: float | None, slot_seconds: int) -> float:
    """How long a refused ID waits before it is planned again: its Retry-After, or one
    slot when it gave none or one that is no number of seconds; at most
    MAX_REFUSAL_WAIT_SECONDS."""
    if retry_after is None or not math.isfinite(retry_after) or retry_after < 0:
        return float(slot_seconds)
    return min(retry_after, MAX_REFUSAL_WAIT_SECONDS)


@dataclass(frozen=True)
class RateChange:
    """A change of a limit's learned rate: the event it made, from what to what."""

    event_id: int
    kind: str
    from_rpm: int
    to_rpm: int


def description(kind: str, from_rpm: int, to_rpm: int, why: str) -> str:
    return f"learned rate {kind} from {from_rpm} to {to_rpm} per slot: {why}"


def is_quiet(
    now: datetime, learned_at: datetime | None, last_refusal_at: datetime | None, quiet
) -> bool:
    """Whether a quiet period has passed since the last change and the last refusal."""
    moments = [moment for moment in (learned_at, last_refusal_at) if moment is not None]
    return all(now - moment >= quiet for moment in moments)
