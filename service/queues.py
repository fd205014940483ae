"""The RQ queues, and the enqueueing that the web side does."""

from __future__ import annotations

import logging
import math

from flask import current_app
from redis.exceptions import RedisError
from rq import Queue

from .extensions import get_redis

log = logging.getLogger(__name__)

PLANNING_QUEUE = "planning"
SLOTS_QUEUE = "slots"
ALL_QUEUES = (SLOTS_QUEUE, PLANNING_QUEUE)  # a worker serves slots first: they are due now

# Named by path so that the web side never imports worker code.
PLAN_TASK_JOB = "workers.planning.plan_task"


def get_queue(name: str) -> Queue:
    return Queue(name, connection=get_redis())


def planning_job_id(task_id: int) -> str:
    return f"plan-{task_id}"


def planning_job_timeout(total_ids: int) -> int:
    """RQ's default of 180 s for small tasks; a big one gets ten times what its IDs take
    at PLANNING_RATE on top, so that only a planner that is really stuck is stopped."""
    return 180 + math.ceil(10 * total_ids / current_app.config["PLANNING_RATE"])


def enqueue_planning(task_id: int, total_ids: int) -> bool:
    """Queue the planning of a stored task; False when Redis could not take it.

    The task is already committed to PostgreSQL, so a Redis outage loses nothing:
    the task stays `received` and reconciling queues it again.
    """
    try:
        get_queue(PLANNING_QUEUE).enqueue(
            PLAN_TASK_JOB,
            task_id,
            job_id=planning_job_id(task_id),
            job_timeout=planning_job_timeout(total_ids),
            failure_ttl=7 * 86400,
        )
    except RedisError:
        log.warning("could not queue planning of task %s; it stays received", task_id)
        return False
    return True
