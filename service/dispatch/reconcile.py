"""Reconcile: rebuild from PostgreSQL what Redis may have lost and what dead workers left.

Run by `flask scheduler` every RECONCILE_INTERVAL_SECONDS, in its own process so that it
never waits for a free worker, and by `flask plan reconcile`.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from flask import current_app

from service.core import locks
from service.core.extensions import db
from service.core.models import Limit
from service.dispatch import claimers, store
from service.jobs import (
    clean_abandoned_jobs,
    drop_far_slot_jobs,
    enqueue_planning,
    enqueue_replan,
    enqueue_retry_planning,
    ensure_slot_job,
    forget_lost_job,
    get_scheduler,
    in_queue_order,
    planning_is_queued,
    planning_job_id,
    replan_is_queued,
    replan_job_id,
    schedule_ahead,
)
from service.limits import held
from service.limits import store as limits
from service.planning import resume as pausing
from service.planning.store import retries_waiting

log = logging.getLogger(__name__)

# A slot job that rode out a restart of PostgreSQL has its claimer's lock again within
# seconds of its return: until this long after the server started, a claimer whose lock
# is missing is taken to be on its way back, not dead.
CLAIMERS_RETURN_SECONDS = 15


def reconcile(after_outage: bool = False, now: datetime | None = None) -> dict[str, int]:
    """Rebuild the schedule from PostgreSQL as it stands at `now` (default: the clock's);
    Redis may have lost any part of it.

    - IDs whose claimer is gone (its worker died) go back to pending at once, as do IDs
      whose claim ran out (its worker is stuck); to cancelled if their task was
      cancelled meanwhile. Right after an outage (`after_outage`: the previous run met
      one; or PostgreSQL started less than CLAIMERS_RETURN_SECONDS ago), gone claimers
      keep their IDs a little longer: a slot job that rode the outage out takes its
      lock again and records what it called, which would otherwise be called again;
    - jobs that RQ still calls started but whose worker stopped beating (it died) are
      marked failed by RQ's own registry clean-up, so that they count as gone below;
    - every slot of a limit not paused with pending IDs that starts within
      SCHEDULE_AHEAD_MINUTES gets its job if it has none waiting or running (a running
      one holds the slot's lock); one whose time has passed runs at once and is marked
      late. Later slots are no loss: they get theirs from a later run, as they come
      within reach, which is at least RECONCILES_AHEAD runs before they start (the
      settings are checked for it), so no slot starts late for want of its job; slot
      jobs that rq-scheduler holds beyond that reach are removed. A paused limit's slots
      wait for its resume, a held one's for its release (service/limits/held.py),
      which happens here once the settings allow it. A job that a worker took from its
      queue and died before starting counts as none;
    - tasks still received or planning get their planning job back if it is gone, and
      retrying IDs a run of the retry planning, and a limit's unfinished re-plan
      (service/planning/replan.py) its job.
    """
    timeout = timedelta(seconds=current_app.config["CLAIM_TIMEOUT_SECONDS"])
    spare_gone = after_outage or _server_just_started()
    released = claimers.release_dead_or_stuck(timeout, dead=not spare_gone)
    now = now or datetime.now(UTC)
    reach = now + schedule_ahead()
    scheduler = get_scheduler()
    running = store.running_slot_keys()
    clean_abandoned_jobs()

    added = late = 0
    for limit in limits.active_limits():
        if _held(limit, now):
            continue
        slots = [
            slot
            for slot in in_queue_order(store.slots_with_pending_ids(limit.id, reach), now)
            # A slot whose job holds its lock is running: never a second job for it.
            # Without the lock, a job Redis calls started is dead once its slot has
            # begun (before, it may still be starting up).
            if locks.slot_key(limit.id, slot) not in running
            and ensure_slot_job(scheduler, limit.name, slot, now, trust_started=slot > now)
        ]
        added += len(slots)
        late += _mark_late(limit.id, [slot for slot in slots if slot <= now])
    far = drop_far_slot_jobs(reach)
    waiting = store.unplanned_tasks()
    requeued = [task for task in waiting if not planning_is_queued(task.id)]
    for task in requeued:
        forget_lost_job(planning_job_id(task.id))
        enqueue_planning(task.id, task.total)
    retries = retries_waiting() and enqueue_retry_planning()
    replans = _requeue_replans()
    return {
        "claims released": released,
        "slot jobs added": added,
        "late slots": late,
        "slot jobs beyond reach removed": far,
        "planning jobs added": len(requeued),
        "retry planning queued": int(retries),
        "re-plans queued": replans,
    }


def _requeue_replans() -> int:
    """The newest re-plan of each limit, unfinished and with no job (Redis lost it, or
    its worker died), queued again: it goes on where it stopped."""
    unfinished = limits.unfinished_replans()
    db.session.commit()
    lost = [(limit_id, event) for limit_id, event in unfinished if not replan_is_queued(event)]
    for limit_id, event in lost:
        forget_lost_job(replan_job_id(event))
        enqueue_replan(limit_id, event)
    return len(lost)


def _held(limit: Limit, now: datetime) -> bool:
    """A held limit's slots get no job, as a paused one's, and it is marked held. One
    marked held that this process's settings allow now is let go first: its IDs whose
    slot passed meanwhile are planned again from now, as a resume plans them."""
    if held.reason_of(limit):
        limits.mark_held(limit.id)
        db.session.commit()
        return True
    if limit.held_since is not None:
        replanned = pausing.release(limit.name, now)
        log.info(
            "limit %s is allowed again: %d IDs whose slot had passed planned again from now",
            limit.name,
            replanned,
            extra={"fields": {"limit": limit.name, "replanned": replanned}},
        )
    return False


def _server_just_started() -> bool:
    return store.server_started_within(timedelta(seconds=CLAIMERS_RETURN_SECONDS))


def _mark_late(limit_id: int, late: list[datetime]) -> int:
    if late:
        store.mark_late(limit_id, late)
    db.session.commit()
    return len(late)
