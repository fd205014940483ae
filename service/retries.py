"""Retries: a failed ID that may be tried again is a request too, so it is planned into a
later slot like any ID, after a backoff.

Recording an outcome only marks the ID `retrying`, with the moment it may run again
(`retry_at`): that never waits for a window lock, which the planner of a big task may
hold for seconds. A job of its own (`workers.planning.plan_retries`, on the planning
queue) then plans the retrying IDs through the same windows, locks and rules as a task.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

from flask import current_app
from redis.exceptions import RedisError
from rq.job import Job
from sqlalchemy import text

from .extensions import db, get_redis
from .models import AssignmentStatus, TaskStatus
from .planning import replan_retries
from .queues import PLANNING_QUEUE, get_queue
from .scheduling import schedule_slots
from .tasks import get_task

log = logging.getLogger(__name__)

PLAN_RETRIES_JOB = "workers.planning.plan_retries"


def backoff(attempts: int) -> timedelta:
    """RETRY_BACKOFF_SECONDS, doubled for each attempt after the first."""
    base = current_app.config["RETRY_BACKOFF_SECONDS"]
    return timedelta(seconds=base * 2 ** (attempts - 1))


def enqueue_retry_planning() -> bool:
    """Queue a run of `plan_retries`; at most one a second is queued."""
    job_id = f"plan-retries-{int(time.time())}"
    try:
        if Job.exists(job_id, connection=get_redis()):
            return False
        get_queue(PLANNING_QUEUE).enqueue(PLAN_RETRIES_JOB, job_id=job_id, result_ttl=3600)
    except RedisError:
        log.warning("could not queue the planning of retries; reconciling will")
        return False
    return True


def retries_waiting() -> bool:
    return db.session.execute(
        text("SELECT EXISTS (SELECT 1 FROM assignments WHERE status = :retrying)"),
        {"retrying": AssignmentStatus.RETRYING},
    ).scalar()


def plan_retries() -> int:
    """Plan every retrying ID into a slot; returns how many were planned.

    One transaction per task and retry moment, so window locks rise in time within each,
    as a planner's do.
    """
    groups = db.session.execute(
        text(
            "SELECT DISTINCT task_id, retry_at FROM assignments WHERE status = :retrying "
            "ORDER BY task_id, retry_at"
        ),
        {"retrying": AssignmentStatus.RETRYING},
    ).all()
    db.session.commit()
    planned, slots = 0, set()
    for task_id, retry_at in groups:
        count, used = _plan_group(task_id, retry_at)
        planned += count
        slots |= used
    schedule_slots(slots)
    return planned


def _plan_group(task_id: int, retry_at: datetime) -> tuple[int, set[datetime]]:
    task = get_task(task_id, lock=True)
    rows = db.session.execute(
        text(
            "SELECT position, user_id FROM assignments "
            "WHERE task_id = :t AND status = :retrying AND retry_at = :r "
            "ORDER BY position FOR UPDATE"
        ),
        {"t": task_id, "retrying": AssignmentStatus.RETRYING, "r": retry_at},
    ).all()
    if task.status == TaskStatus.CANCELLED:
        db.session.execute(
            text(
                "UPDATE assignments SET status = :cancelled, retry_at = NULL "
                "WHERE task_id = :t AND status = :retrying"
            ),
            {
                "t": task_id,
                "cancelled": AssignmentStatus.CANCELLED,
                "retrying": AssignmentStatus.RETRYING,
            },
        )
        rows = []
    if not rows:
        db.session.commit()
        return 0, set()
    used = replan_retries(task_id, task.overflow, [tuple(row) for row in rows], retry_at)
    task.last_slot = max([task.last_slot, *used]) if task.last_slot else max(used)
    db.session.commit()
    return len(rows), used
