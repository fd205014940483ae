"""Keeping the partitions of `assignments`: days made ahead, and days dropped once their
tasks are finished and old.

A day's partition goes when the day has ended and every task created on it finished at
least RETENTION_DAYS ago. Its tasks keep their rows (counts, status, first and last
slot) and are marked with when their IDs went; their `/ids/` answer 410 Gone from then.
The slots before the oldest day still kept (and before the retention), and re-plan
events finished before the retention, go too: nothing of the kept days refers to them.
The scheduler runs this with reconcile; `flask plan retention` runs it by hand.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from flask import current_app

from service.core import partitions
from service.core.extensions import db
from service.planning.store import database_now
from service.retention import store

log = logging.getLogger(__name__)


@dataclass
class Upkeep:
    """What one run of retention did."""

    made: list[date] = field(default_factory=list)  # partitions made ahead
    removed: list[date] = field(default_factory=list)  # days whose IDs were dropped
    tasks: int = 0  # tasks whose IDs went with them
    slots: int = 0  # slot rows deleted
    events: int = 0  # re-plan events deleted


def keep_days(now: datetime | None = None) -> Upkeep:
    """Make the partitions ahead of today, then drop the days past retention. `now`
    decides what is past retention (the benchmark moves it on); the days made ahead
    always follow the database's clock."""
    today = database_now()
    db.session.commit()
    upkeep = Upkeep(made=partitions.ensure_ahead(today.date()))
    now = now or today
    cutoff = now - timedelta(days=current_app.config["RETENTION_DAYS"])
    for day in sorted(partitions.partition_days()):
        # A task of a later day cannot have finished by the cutoff; and a day that has
        # not ended may still get tasks.
        if store.midnight(day) >= cutoff or store.midnight(day + timedelta(days=1)) > now:
            break
        removed = _remove_day(day, cutoff)
        if removed is not None:
            upkeep.removed.append(day)
            upkeep.tasks += removed
    if upkeep.removed:
        _expire_bookkeeping(upkeep, cutoff)
        days = ", ".join(day.isoformat() for day in upkeep.removed)
        log.info("retention: the IDs of %s removed (%d tasks)", days, upkeep.tasks)
    return upkeep


def _expire_bookkeeping(upkeep: Upkeep, cutoff: datetime) -> None:
    """The slots and events that only the removed days referred to; at each removal
    only, as nothing else makes more of them expire."""
    kept = partitions.partition_days()
    # Before the cutoff as well: a task plans only into slots after it was created, but
    # `plan_stored_task(now=...)` in a test or a benchmark may plan before.
    before = min(store.midnight(min(kept)), cutoff) if kept else cutoff
    upkeep.slots = store.delete_slots_before(before)
    upkeep.events = store.delete_events_before(cutoff)
    db.session.commit()


def _remove_day(day: date, cutoff: datetime) -> int | None:
    """Mark the day's tasks as having lost their IDs, then drop its partition; None when
    one of its tasks is unfinished or finished after `cutoff`, or another process is
    dropping a day. The mark commits first: a drop cut short is finished by the next run,
    whose look at the tasks finds them all marked and expired still."""
    tasks = store.lock_day_tasks(day, cutoff)
    if not all(tasks.values()):
        db.session.rollback()
        return None
    store.mark_removed(list(tasks))
    db.session.commit()
    return len(tasks) if partitions.drop_day(day) else None
