"""Slots: the grid of the deployment's slots and windows, each limit's slot loads, and a
limit's plan as it is read back, slot by slot, grouped by window. Every limit has slots
of its own on the same grid."""

from __future__ import annotations

from datetime import UTC, datetime

from flask import current_app
from sqlalchemy import select, text

from service.core.extensions import db
from service.core.models import AssignmentStatus, Slot
from service.limits.settings import shared
from service.limits.store import named_by_request
from service.planning.planner import SlotGrid

# One answer shows at most a day of one-minute slots.
MAX_SLOTS_SHOWN = 1440
DEFAULT_WINDOWS_SHOWN = 4


def slot_grid(values: dict[str, int] | None = None) -> SlotGrid:
    """The deployment's slots (from its shared `values`, read if not given)."""
    values = values or shared()
    return SlotGrid(
        values["SLOT_SECONDS"], values["WINDOW_SLOTS"], current_app.config["PLAN_LEAD_SECONDS"]
    )


def plan_between(
    start: datetime | None,
    end: datetime | None,
    windows: int = DEFAULT_WINDOWS_SHOWN,
    now: datetime | None = None,
    limit_name: str | None = None,
) -> dict:
    """A limit's slots (default: the default limit's) from `start`'s window to `end`
    (default: `windows` windows later), as they stand at `now` (default: the clock's)."""
    limit = named_by_request(limit_name)
    grid = slot_grid()
    now = now or datetime.now(UTC)
    start = grid.window_of(start or now)
    # A range ending before it starts is empty; a long one is cut: the client asks again
    # from the last slot shown.
    end = min(
        end or start + windows * grid.window_length, start + MAX_SLOTS_SHOWN * grid.slot_length
    )
    rpm = limit.rpm
    stored = {
        slot.slot_start: slot
        for slot in db.session.scalars(
            select(Slot).where(
                Slot.limit_id == limit.id, Slot.slot_start >= start, Slot.slot_start < end
            )
        )
    }
    windows = []
    window = start
    while window < end:
        slots = [
            _slot(moment, stored.get(moment), rpm, grid.is_open(moment, now))
            for moment in grid.slots_of_window(window)
            if moment < end
        ]
        windows.append(
            {
                "start": window,
                "end": grid.next_window(window),
                "load": sum(slot["load"] for slot in slots),
                "capacity": rpm * len(slots),
                "slots": slots,
            }
        )
        window = grid.next_window(window)
    return {
        "limit": limit.name,
        "paused": limit.paused,
        "rpm": rpm,
        "slot_seconds": grid.slot_seconds,
        "window_slots": grid.window_slots,
        "now": now,
        "windows": windows,
    }


def _slot(moment: datetime, stored: Slot | None, rpm: int, is_open: bool) -> dict:
    return {
        "start": moment,
        "load": stored.load if stored else 0,
        "capacity": rpm,
        "done": stored.done if stored else 0,
        "failed": stored.failed if stored else 0,
        "open": is_open,
        "started_at": stored.started_at if stored else None,
        "late": stored.late if stored else False,
    }


def ids_by_slot(
    limit_id: int, start: datetime, end: datetime, per_slot: int
) -> dict[datetime, list[int]]:
    """The first `per_slot` IDs planned into each of a limit's slots of [start, end), in
    plan order."""
    rows = db.session.execute(
        text(
            "SELECT slot_start, user_id FROM ("
            "  SELECT slot_start, user_id, row_number() OVER ("
            "    PARTITION BY slot_start ORDER BY task_id, position) AS rank"
            "  FROM assignments"
            "  WHERE limit_id = :limit AND slot_start >= :start AND slot_start < :end"
            "    AND status <> :cancelled"
            ") AS ranked WHERE rank <= :per_slot ORDER BY slot_start, rank"
        ),
        {
            "limit": limit_id,
            "start": start,
            "end": end,
            "per_slot": per_slot,
            "cancelled": AssignmentStatus.CANCELLED,
        },
    )
    listed: dict[datetime, list[int]] = {}
    for slot_start, user_id in rows:
        listed.setdefault(slot_start, []).append(user_id)
    return listed
