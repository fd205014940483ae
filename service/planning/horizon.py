"""The plan's horizon: no new plan reaches more than MAX_PLAN_DAYS past now.

A plan is a promise, and one years ahead is none: a task or a preview whose last ID would
land past the horizon is refused, before anything of it is stored, saying the slot its
last ID would need and how many of its IDs fit.

Submission answers at once and planning runs later, so the horizon is checked twice:

- when a task is submitted, or its IDs or plan rules change (`admit`), and by a preview:
  by arithmetic on the limit's slots (one range read of their loads, not a plan). A
  spread task's overflow never leaves its target window, so only a window that starts
  past the horizon refuses it; a deferring task fills the slots in time order, so it
  fits when the places below RPM left by the horizon hold its IDs;
- by the planner itself (`WindowPlanner` with a horizon), since other tasks may have
  taken capacity in between: the planning job then refuses the task (status `refused`,
  with the reason as its `error`) rather than promise past the horizon.

IDs promised already (retries, resumes) are planned again without a horizon.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

from flask import current_app

from service.core.errors import Refused
from service.core.extensions import db
from service.core.models import IdTask, Limit, Overflow
from service.limits import store as limits
from service.limits.settings import shared
from service.planning import store
from service.planning.planner import Overreach, SlotGrid, overreach
from service.planning.reading import slot_grid

DAY_SECONDS = 86400


def horizon_days() -> int:
    return current_app.config["MAX_PLAN_DAYS"]


def planning_grid(values: dict[str, int], expected_ids: int, days: int | None) -> SlotGrid:
    """The grid a plan of `expected_ids` IDs uses: its slots open only once the lead covers
    the time those IDs take to write (PLANNING_RATE), and, with `days`, up to the horizon."""
    grid = slot_grid(values)
    writing = expected_ids / current_app.config["PLANNING_RATE"]
    return replace(
        grid,
        lead_seconds=grid.lead_seconds + writing,
        horizon_seconds=None if days is None else days * DAY_SECONDS,
    )


class PastTheHorizon(Refused):
    """A plan that would go past the horizon; `errors` names the field that takes it
    there (`not_before` when that is past it, else `ids`) with the figures."""

    def __init__(
        self, reach: Overreach, total: int, not_before: datetime | None, now: datetime, days: int
    ):
        horizon = now + timedelta(days=days)
        field = "ids" if not_before is None or not_before <= horizon else "not_before"
        cause = (
            f"not_before {not_before.isoformat()} is past"
            if field == "not_before"
            else "the plan would go past"
        )
        super().__init__(
            f"{cause} the horizon of {days} day{'' if days == 1 else 's'} ahead "
            f"(MAX_PLAN_DAYS), {horizon.isoformat()}: its last ID would need the slot of "
            f"{reach.last_slot.isoformat()} at the earliest, and {reach.fit} of its "
            f"{total} IDs fit by the horizon",
            {
                field: {
                    "horizon": horizon.isoformat(),
                    "max_plan_days": days,
                    "last_slot": reach.last_slot.isoformat(),
                    "fit": reach.fit,
                    "total": total,
                }
            },
        )


def check(
    limit: Limit,
    overflow: str,
    not_before: datetime | None,
    total: int,
    now: datetime | None = None,
) -> None:
    """Refuse (PastTheHorizon) a plan of `total` IDs into `limit` at `now` (default: the
    database's clock) whose last ID would land past the horizon, by the limit's loads of
    now and the planner's rules."""
    values = shared()
    grid = planning_grid(values, total, horizon_days())
    now = now or store.database_now()
    spread = overflow == Overflow.SPREAD
    min_open = values["SPREAD_MIN_OPEN_SLOTS"]
    if spread and grid.spread_window(now, not_before, min_open) is not None:
        return
    rpm = limits.slot_capacity(limit)
    first, last = grid.open_span(now, not_before)
    placed = store.placed_below_rpm(limit.id, first, last, rpm) if first <= last else 0
    reach = overreach(grid, now, not_before, total, rpm, placed)
    if reach is not None:
        raise PastTheHorizon(reach, total, not_before, now, horizon_days())


def admit(task: IdTask) -> None:
    """The check of a task about to be planned (new, or with new IDs or plan rules),
    before its transaction commits; refused, the transaction is rolled back, so that
    nothing of it stays: its row, or its new IDs, streamed in by COPY."""
    try:
        if task.limit is None:
            raise Refused(
                f"task {task.id}'s limit was deleted: name one to plan it into",
                {"limit": ["its limit was deleted; name one (see GET /limits/)"]},
            )
        check(task.limit, task.overflow, task.not_before, task.total)
    except Refused:
        db.session.rollback()
        raise
