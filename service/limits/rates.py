"""Changing a limit's learned rate (the rules are service/limits/learning.py's): lowered
by refusals as they are recorded, raised after a quiet period as slots end, reset by
the operator. Each change is an event; the caller enqueues its re-plan once the
transaction has committed.
"""

from __future__ import annotations

import logging

from service.limits import store
from service.limits.learning import (
    LOWERED,
    RAISED,
    RESET,
    RateChange,
    capacity,
    description,
    is_quiet,
    lowered,
    quiet_period,
    raised,
)
from service.limits.store import SlotOfLimit
from service.processors.contract import Refused, bounded

log = logging.getLogger(__name__)


def note_refusals(
    slot: SlotOfLimit, refusals: list[Refused], slot_seconds: int, seen: float | None = None
) -> RateChange | None:
    """Count a slot's refusals on its limit and, unless this slot lowered the rate
    already (or adaptation is off), lower it; in the caller's transaction, after the
    outcomes were written. `seen` is what the caller itself saw the downstream
    accept over the last slot's length, if it knows (the slots' counters cannot tell:
    a slot's calls may start well after it does, when the one before runs on). Returns
    the change, if any."""
    last = refusals[-1]
    reason = bounded(last.message)
    store.record_refusals(slot.limit_id, len(refusals), last.status, last.retry_after, reason)
    limit = store.learned(slot.limit_id)
    if not limit.adaptive:
        return None
    if limit.learned_slot is not None and limit.learned_slot >= slot.start:
        return None  # one burst of refusals counts once
    current = capacity(limit.rpm, limit.learned_rpm)
    new = lowered(current, seen)
    if new >= current:
        return None
    judged = "" if seen is None else f", {seen:.0f} accepted over the last slot"
    why = f"{len(refusals)} refused in the slot of {slot.start.isoformat()}{judged} ({reason})"
    return _change(slot.limit_id, limit.rpm, LOWERED, current, new, why, slot.start)


def raise_if_quiet(limit_id: int, slot_seconds: int) -> RateChange | None:
    """Raise a lowered rate by one step once a quiet period has passed without a
    refusal or a change; the caller commits."""
    quiet = quiet_period(slot_seconds)

    def due(limit) -> bool:
        if limit is None or limit.learned_rpm is None or not limit.adaptive:
            return False
        return is_quiet(limit.now, limit.learned_at, limit.last_refusal_at, quiet)

    # Read first without a lock: most slots end with nothing to raise.
    if not due(store.learned(limit_id)):
        return None
    limit = store.learned(limit_id, lock=True)
    if not due(limit):
        return None
    current = capacity(limit.rpm, limit.learned_rpm)
    new = raised(current, limit.rpm)
    if new == current:  # at rpm already (it was lowered to below the rate learned)
        return None
    why = f"no refusal for {quiet.total_seconds():.0f} s"
    return _change(limit_id, limit.rpm, RAISED, current, new, why)


def reset(limit_id: int, rpm: int, why: str) -> RateChange | None:
    """The learned rate back at `rpm`, the limit's (new) one; the caller commits."""
    limit = store.learned(limit_id, lock=True)
    if limit is None or limit.learned_rpm is None:
        return None
    return _change(limit_id, rpm, RESET, capacity(rpm, limit.learned_rpm), rpm, why)


def _change(
    limit_id: int, rpm: int, kind: str, current: int, new: int, why: str, slot=None
) -> RateChange:
    event = store.new_event(limit_id, kind, why, current, new)
    store.set_learned(limit_id, None if new >= rpm else new, slot, event)
    log.warning(
        "limit %s: %s",
        limit_id,
        description(kind, current, new, why),
        extra={"fields": {"limit_id": limit_id, "event": event, "from": current, "to": new}},
    )
    return RateChange(event, kind, current, new)
