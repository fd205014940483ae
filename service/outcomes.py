"""Outcomes and retries: what becomes of each processed ID.

An ID becomes `done`, `failed` (after MAX_ATTEMPTS, or a failure marked final), or
`retrying`: a retry is a request too, so it is planned into a later slot like any ID,
after a backoff. Recording an outcome only marks the ID `retrying` with the moment it may
run again (`retry_at`), which never waits for a window lock that the planner of a big
task may hold for seconds; a job of its own (`workers.planning.plan_retries`, on the
planning queue) then plans the retrying IDs through the same windows, locks and rules as
a task.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from flask import current_app
from redis.exceptions import RedisError
from rq.job import Job
from rq.timeouts import JobTimeoutException
from sqlalchemy import text

from workers.processors import Failure, as_failure, takes

from .claims import Claim, claim_keys, hold
from .extensions import db, get_redis, raw_connection
from .id_tasks import get_task
from .limits import SlotOfLimit
from .models import AssignmentStatus, IdTask, TaskStatus
from .planning import WindowPlanner
from .queues import PLANNING_QUEUE, get_queue
from .scheduling import schedule_slots
from .shared_settings import shared

log = logging.getLogger(__name__)

PLAN_RETRIES_JOB = "workers.planning.plan_retries"
# The statuses a task's counters move it to.
TASK_OUTCOMES = {
    "cancelled": TaskStatus.CANCELLED,
    "running": TaskStatus.RUNNING,
    "failed": TaskStatus.FAILED,
    "done": TaskStatus.DONE,
}


@dataclass(frozen=True)
class Tally:
    """Outcomes recorded: IDs done, and attempts that failed (to be retried or not)."""

    done: int = 0
    failed: int = 0

    @property
    def processed(self) -> int:
        return self.done + self.failed

    def __add__(self, other: Tally) -> Tally:
        return Tally(self.done + other.done, self.failed + other.failed)


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
    planned, slots = 0, defaultdict(set)
    for task_id, retry_at in groups:
        count, limit_name, used = _plan_group(task_id, retry_at)
        planned += count
        slots[limit_name] |= used
    for limit_name, used in slots.items():
        schedule_slots(limit_name, used)
    return planned


def _plan_group(task_id: int, retry_at: datetime) -> tuple[int, str | None, set[datetime]]:
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
        return 0, None, set()
    planner = replan_in_place(task, [tuple(row) for row in rows], retry_at)
    db.session.commit()
    return len(rows), planner.limit.name, planner.used_slots


def process_and_record(
    slot: SlotOfLimit,
    claimer: int,
    group: list[Claim],
    processor,
    max_attempts: int | None = None,
) -> Tally:
    """Process the IDs of the group that this claim still holds, and record their
    outcomes, in one transaction."""
    held = hold(group, claimer)
    if not held:
        db.session.commit()
        return Tally()
    failures = process(processor, held, slot)
    return record_outcomes(slot, held, failures, max_attempts)


def process(processor, group: list[Claim], slot: SlotOfLimit) -> dict[int, Failure]:
    """Call a group processor inside a savepoint: what it writes commits with the outcomes.

    A processor that takes `keys` gets each ID's idempotency key alongside it; one that
    takes `options`, its limit's options.
    """
    user_ids = [c.user_id for c in group]
    extra = {}
    if takes(processor, "keys"):
        extra["keys"] = [c.key(slot.deployment) for c in group]
    if takes(processor, "options"):
        extra["options"] = slot.options
    try:
        with db.session.begin_nested():
            verdicts = processor(user_ids, **extra) or {}
    except JobTimeoutException:
        raise  # the job's own time is up: not the processor's failure
    except Exception as exc:  # a processor's bug fails its IDs, not the slot
        log.exception("processor failed on %d IDs", len(user_ids))
        return {user_id: Failure(f"{type(exc).__name__}: {exc}") for user_id in user_ids}
    return {user_id: as_failure(verdict) for user_id, verdict in verdicts.items()}


def record_outcomes(
    slot: SlotOfLimit,
    group: list[Claim],
    failures: Mapping[int, Failure],
    max_attempts: int | None = None,
) -> Tally:
    """Done, failed for good, or retrying (planned again by a job of its own); counters
    follow. `max_attempts` is the deployment's, read here when the caller has not.

    Only rows still held by this claim are written: if the claim timed out and the IDs
    went to another worker meanwhile, that worker's outcome is the one that counts.
    """
    task_ids = sorted({item.task_id for item in group})
    # Task rows first, in id order, as every writer of several tasks takes them.
    statuses = dict(
        db.session.execute(
            text("SELECT id, status FROM id_tasks WHERE id = ANY(:ids) ORDER BY id FOR UPDATE"),
            {"ids": task_ids},
        ).all()
    )
    max_attempts = max_attempts or shared()["MAX_ATTEMPTS"]
    verdicts = [
        _verdict(item, failures.get(item.user_id), statuses.get(item.task_id), max_attempts)
        for item in group
    ]
    written = _write_outcomes(group, verdicts)
    succeeded = [row for row in written if row.status == AssignmentStatus.DONE]
    db.session.execute(
        text(
            "UPDATE slots SET done = done + :d, failed = failed + :f "
            "WHERE limit_id = :l AND slot_start = :s"
        ),
        {
            "d": len(succeeded),
            "f": len(written) - len(succeeded),
            "l": slot.limit_id,
            "s": slot.start,
        },
    )
    _count_on_tasks(written)
    db.session.commit()
    if any(row.status == AssignmentStatus.RETRYING for row in written):
        enqueue_retry_planning()
    return Tally(len(succeeded), len(written) - len(succeeded))


def _verdict(item: Claim, failure: Failure | None, task_status: str | None, max_attempts: int):
    """(new status, error, retry at) of one claimed ID."""
    if failure is None:
        return AssignmentStatus.DONE, None, None
    if not failure.retry or item.attempts + 1 >= max_attempts:
        return AssignmentStatus.FAILED, failure.message, None
    if task_status == TaskStatus.CANCELLED:
        return AssignmentStatus.CANCELLED, failure.message, None  # no retry for a cancelled task
    retry_at = datetime.now(UTC) + backoff(item.attempts + 1)
    return AssignmentStatus.RETRYING, failure.message, retry_at


def _write_outcomes(group: list[Claim], verdicts: list[tuple]) -> list:
    """One statement for the whole group; returns the rows that were still ours."""
    return db.session.execute(
        text(
            "UPDATE assignments AS a SET status = k.status, attempts = a.attempts + 1, "
            "  error = k.error, claimed_at = NULL, claimed_by = NULL, claimed_until = NULL, "
            "  retry_at = k.retry_at, "
            "  finished_at = CASE WHEN k.status = :retrying THEN NULL "
            "                ELSE clock_timestamp() END "
            "FROM unnest(CAST(:tasks AS bigint[]), CAST(:positions AS int[]), "
            "            CAST(:claimed AS timestamptz[]), CAST(:statuses AS text[]), "
            "            CAST(:errors AS text[]), CAST(:retry_at AS timestamptz[])) "
            "  AS k(task_id, position, claimed_at, status, error, retry_at) "
            "WHERE a.task_id = k.task_id AND a.position = k.position "
            "  AND a.status = :running AND a.claimed_at = k.claimed_at "
            "RETURNING a.task_id, a.position, a.user_id, a.attempts, a.status"
        ),
        {
            **claim_keys(group),
            "statuses": [status for status, _, _ in verdicts],
            "errors": [error for _, error, _ in verdicts],
            "retry_at": [retry_at for _, _, retry_at in verdicts],
            "retrying": AssignmentStatus.RETRYING,
            "running": AssignmentStatus.RUNNING,
        },
    ).all()


def _count_on_tasks(written: list) -> None:
    """Add the outcomes to their tasks; one whose IDs have all finished becomes done, or
    failed if any failed."""
    counts: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for row in written:
        if row.status == AssignmentStatus.DONE:
            counts[row.task_id][0] += 1
        elif row.status == AssignmentStatus.FAILED:
            counts[row.task_id][1] += 1
    for task_id in sorted(counts):
        n_done, n_failed = counts[task_id]
        db.session.execute(
            text(
                "UPDATE id_tasks SET done = done + :d, failed = failed + :f, "
                "  status = CASE WHEN status = :cancelled THEN status "
                "    WHEN done + :d + failed + :f < total THEN :running "
                "    WHEN failed + :f > 0 THEN :failed ELSE :done END "
                "WHERE id = :t"
            ),
            {"d": n_done, "f": n_failed, "t": task_id, **TASK_OUTCOMES},
        )


def replan_in_place(
    task: IdTask,
    positions: list[tuple[int, int]],
    not_before: datetime | None,
    now: datetime | None = None,
    expected_ids: int | None = None,
) -> WindowPlanner:
    """Plan IDs of a task that are still in their rows (retrying ones, or pending ones
    whose slot passed) into its limit's slots from `not_before` on (or from now, if that
    has passed); the task's last slot follows. `now` and `expected_ids` are the
    planner's (default: the database's clock, and the IDs given).

    Called with the task's row lock held; the planner tells the slots used, to be
    scheduled once the transaction commits.
    """

    def write(pairs: Iterator, slots: list[datetime]) -> list[int]:
        counts = [0] * len(slots)
        moves = []
        for (position, _user_id), index in pairs:
            moves.append((slots[index], AssignmentStatus.PENDING, task.id, position))
            counts[index] += 1
        with raw_connection().cursor() as cur:
            cur.executemany(
                "UPDATE assignments SET slot_start = %s, status = %s, retry_at = NULL "
                "WHERE task_id = %s AND position = %s",
                moves,
            )
        return counts

    planner = WindowPlanner(
        task.limit_id,
        task.overflow,
        now,
        expected_ids=expected_ids or len(positions),
        not_before=not_before,
    )
    planner.plan(iter(positions), write)
    used = planner.used_slots
    task.last_slot = max([task.last_slot, *used]) if task.last_slot else max(used)
    return planner
