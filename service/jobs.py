"""The Redis side: the RQ queues, the paths of every job, one rq-scheduler job per slot
of each limit, the planning jobs, and the scheduler process.

Redis holds only what can be rebuilt: every function here may be called again for the
same slot or task and adds nothing that is already there. Jobs are named by path, so
that nothing here imports the RQ entry points in `workers/`. rq-scheduler holds the jobs
of the slots starting within SCHEDULE_AHEAD_MINUTES only: reconcile adds the later
ones as time passes, so Redis holds a bounded number of jobs however far a plan reaches.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from flask import current_app
from redis.exceptions import RedisError
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq_scheduler import Scheduler

from service.core.extensions import get_redis
from service.core.outages import describe, forget_session, is_outage
from service.limits.store import DEFAULT, slots_with_pending_ids

log = logging.getLogger(__name__)

PLANNING_QUEUE = "planning"
SLOTS_QUEUE = "slots"
ALL_QUEUES = (SLOTS_QUEUE, PLANNING_QUEUE)  # a worker serves slots first: they are due now

# The RQ entry points (workers/), by path: stored jobs name them, so they never change.
SLOT_JOB = "workers.slots.run_slot"
PLAN_TASK_JOB = "workers.planning.plan_task"
PLAN_RETRIES_JOB = "workers.planning.plan_retries"
REPLAN_JOB = "workers.planning.replan_limit"
# rq-scheduler moves due jobs once a second: a slot job due this much before its slot
# reaches a worker in time, and waits inside itself for the exact start.
EARLY_SECONDS = 1.5
# Results of finished slot jobs are kept this long, for the dashboard.
RESULT_TTL_SECONDS = 3600
WAITING_STATUSES = (JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED)
# A job marked queued that no queue holds is taken for lost after this (see
# _waits_for_real); the marker that times it expires by itself.
LOST_AFTER_SECONDS = 15.0
LOST_MARKER = "slotted:off-queue:{}"
LOST_MARKER_TTL_SECONDS = 3600
SLOT_JOB_PREFIX = "slot-"
# Jobs that rq-scheduler holds for slots past SCHEDULE_AHEAD_MINUTES (scheduled before
# it existed) removed per reconcile run, so that a run stays short however many there are.
FAR_JOBS_PER_RUN = 10_000


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


def enqueue_retry_planning() -> bool:
    """Queue a run of `plan_retries`; at most one a second is queued. At the front of
    the slots queue, as a re-plan: IDs refused or failed a moment ago wait for it, and a
    worker busy pacing slots would otherwise take every due slot job first."""
    job_id = f"plan-retries-{int(time.time())}"
    try:
        if Job.exists(job_id, connection=get_redis()):
            return False
        get_queue(SLOTS_QUEUE).enqueue(
            PLAN_RETRIES_JOB, job_id=job_id, result_ttl=3600, at_front=True
        )
    except RedisError:
        log.warning("could not queue the planning of retries; reconciling will")
        return False
    return True


REPLAN_JOB_TIMEOUT_SECONDS = 3600


def replan_job_id(event_id: int) -> str:
    return f"replan-{event_id}"


def enqueue_replan(limit_id: int, event_id: int) -> bool:
    """Queue the re-plan that a change of a limit's learned rate calls for; False when
    Redis could not take it (reconciling queues it again: the event stays unfinished).
    At the front of the slots queue: it moves IDs out of slots about to start, and a
    worker takes a due slot job before any planning job."""
    try:
        get_queue(SLOTS_QUEUE).enqueue(
            REPLAN_JOB,
            limit_id,
            event_id,
            job_id=replan_job_id(event_id),
            # Ten million IDs take minutes; a re-plan stopped midway goes on when run again.
            job_timeout=REPLAN_JOB_TIMEOUT_SECONDS,
            result_ttl=3600,
            failure_ttl=7 * 86400,
            at_front=True,
        )
    except RedisError:
        log.warning("could not queue re-plan %s of limit %s; reconciling will", event_id, limit_id)
        return False
    return True


class ServiceScheduler(Scheduler):
    """rq-scheduler that also runs `maintenance` (reconcile) itself every
    `maintenance_seconds`, between its polls.

    Run in the scheduler's own process, reconcile never waits for a free worker: when
    every worker has died, a fresh one finds the dead one's slot queued again.
    Redis losing everything cannot lose it either. A run that fails leaves no broken
    session behind, so the next one starts clean; a stop signal stops it even while
    Redis is away (its own bookkeeping there expires by itself).
    """

    def __init__(
        self,
        *args,
        maintenance: Callable[[bool], object],
        maintenance_seconds: float,
        after_outage: bool = False,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self._maintenance = maintenance
        self._maintenance_seconds = maintenance_seconds
        self._maintenance_due = time.monotonic()
        # Whether the last run met an outage: `maintenance` is told, see reconcile().
        self.after_outage = after_outage

    def enqueue_jobs(self):
        if time.monotonic() >= self._maintenance_due:
            self._maintenance_due = time.monotonic() + self._maintenance_seconds
            try:
                self._maintenance(self.after_outage)
                self.after_outage = False
            except Exception as error:  # retried at the next run; keep scheduling
                forget_session()
                self.after_outage = is_outage(error)
                if self.after_outage:
                    log.warning("reconcile failed: %s", describe(error))
                else:
                    log.exception("reconcile failed")
        return super().enqueue_jobs()

    def register_death(self):
        with contextlib.suppress(RedisError):
            super().register_death()

    def remove_lock(self):
        with contextlib.suppress(RedisError):
            super().remove_lock()


def slot_job_id(limit_name: str, slot: datetime) -> str:
    return f"{SLOT_JOB_PREFIX}{limit_name}-{slot.astimezone(UTC):%Y%m%dT%H%M%S}"


def schedule_ahead() -> timedelta:
    """How far ahead of now rq-scheduler holds slot jobs (SCHEDULE_AHEAD_MINUTES)."""
    return timedelta(minutes=current_app.config["SCHEDULE_AHEAD_MINUTES"])


def _slot_job_args(limit_name: str, slot: datetime) -> tuple[str, str]:
    """The slot first: a job queued before limits existed ran its slot of the default."""
    return slot.isoformat(), limit_name


def get_scheduler() -> Scheduler:
    return Scheduler(queue_name=SLOTS_QUEUE, connection=get_redis())


@dataclass(frozen=True)
class ScheduledJob:
    id: str
    due: datetime
    # The slot it runs and its limit, for a slot job.
    slot: datetime | None
    limit: str | None


def scheduled_jobs(limit: int) -> tuple[list[ScheduledJob], int]:
    """The first `limit` jobs that rq-scheduler holds, soonest first, and how many it
    holds in all. It keeps them in a schedule of its own, which RQ's registries (and so
    rq-dashboard's "Scheduled jobs") never show."""
    scheduler = get_scheduler()
    held = scheduler.get_jobs(with_times=True, offset=0, length=limit)
    jobs = [
        ScheduledJob(
            job.id,
            due.replace(tzinfo=UTC),  # rq-scheduler gives due times as naive UTC
            *_slot_of(job),
        )
        for job, due in held
    ]
    return jobs, scheduler.count()


def _slot_of(job: Job) -> tuple[datetime | None, str | None]:
    if job.func_name != SLOT_JOB:
        return None, None
    slot, limit_name = (*job.args, DEFAULT)[:2]
    return datetime.fromisoformat(slot), limit_name


def schedule_slots(
    limit_name: str, slots: Iterable[datetime], planned_at: datetime | None = None
) -> int:
    """Give each of a limit's slots that starts within SCHEDULE_AHEAD_MINUTES of
    `planned_at` (default: now) its job, due just before its start; return how many were
    added. Reconcile gives the later ones theirs as they come within that reach.

    When Redis cannot be reached the plan is still in PostgreSQL, and reconciling
    schedules it later.
    """
    reach = (planned_at or datetime.now(UTC)) + schedule_ahead()
    near = in_queue_order([slot for slot in slots if slot <= reach], datetime.now(UTC))
    try:
        scheduler = get_scheduler()
        return sum(ensure_slot_job(scheduler, limit_name, slot) for slot in near)
    except RedisError:
        log.warning("could not schedule slot jobs; reconciling will")
        return 0


def in_queue_order(slots: Iterable[datetime], now: datetime) -> list[datetime]:
    """The order in which to give slots their jobs so that overdue ones, each queued at
    the front, end up earliest first: those begun latest first, then the others."""
    begun = sorted((slot for slot in slots if slot <= now), reverse=True)
    return begun + sorted(slot for slot in slots if slot > now)


def drop_far_slot_jobs(reach: datetime) -> int:
    """Remove up to FAR_JOBS_PER_RUN of the slot jobs that rq-scheduler holds for slots
    after `reach` (scheduled by a version that gave every slot its job at planning, or
    before SCHEDULE_AHEAD_MINUTES was shortened); returns how many. Their slots get them
    back from reconcile once they come within reach."""
    scheduler = get_scheduler()
    due_after = (reach - timedelta(seconds=EARLY_SECONDS)).timestamp()
    held = get_redis().zrangebyscore(
        scheduler.scheduled_jobs_key, f"({due_after}", "+inf", start=0, num=FAR_JOBS_PER_RUN
    )
    far = [raw.decode() for raw in held if raw.startswith(SLOT_JOB_PREFIX.encode())]
    if far:
        pipe = get_redis().pipeline(transaction=False)
        pipe.zrem(scheduler.scheduled_jobs_key, *far)
        pipe.delete(*(Job.key_for(job_id) for job_id in far))
        pipe.execute()
    return len(far)


def ensure_slot_job(
    scheduler: Scheduler,
    limit_name: str,
    slot: datetime,
    now: datetime | None = None,
    *,
    trust_started=True,
) -> bool:
    """Schedule a limit's slot's job unless one is waiting or running; True if one was
    added.

    A slot whose time is near or past goes straight onto the queue. With
    `trust_started` False, a job that Redis says is running is taken for dead (its
    worker was killed) and replaced.
    """
    job_id = slot_job_id(limit_name, slot)
    if job_id in scheduler:
        return False
    job = _job(job_id)
    status = job.get_status(refresh=False) if job else None
    if status in WAITING_STATUSES and _waits_for_real(job):
        return False
    if status == JobStatus.STARTED and trust_started:
        return False
    forget_lost_job(job_id)
    now = now or datetime.now(UTC)
    due = slot - timedelta(seconds=EARLY_SECONDS)
    if due > now:
        _schedule_slot_job(scheduler, limit_name, slot, due)
    else:
        # A slot already under way (or overdue) goes ahead of slots yet to start.
        get_queue(SLOTS_QUEUE).enqueue(
            SLOT_JOB,
            *_slot_job_args(limit_name, slot),
            job_id=job_id,
            job_timeout=_slot_job_timeout(),
            result_ttl=RESULT_TTL_SECONDS,
            at_front=slot <= now,
        )
    return True


def drop_idle_slot_jobs(limit_id: int, limit_name: str, slots: Iterable[datetime]) -> int:
    """Remove the waiting jobs of those of a limit's slots that hold no pending ID any
    more (their last IDs were cancelled, or planned elsewhere); returns how many.

    A planner may fill such a slot meanwhile and find its job there still: a slot that
    holds pending IDs again once its job is gone gets it back, so none is left without
    one. With Redis away nothing is removed; those jobs find nothing to do.
    """
    slots = sorted(set(slots))
    if not slots:
        return 0
    try:
        return _drop_idle_slot_jobs(limit_id, limit_name, slots)
    except RedisError:
        log.warning("could not remove the jobs of slots left empty of %s", limit_name)
        return 0


def _drop_idle_slot_jobs(limit_id: int, limit_name: str, slots: list[datetime]) -> int:
    scheduler = get_scheduler()
    slots = _slots_with_jobs(scheduler, limit_name, slots)
    busy = slots_with_pending_ids(limit_id, slots)
    dropped = [
        slot
        for slot in slots
        if slot not in busy and _drop_waiting_job(scheduler, slot_job_id(limit_name, slot))
    ]
    refilled = slots_with_pending_ids(limit_id, dropped)
    for slot in sorted(refilled):
        ensure_slot_job(scheduler, limit_name, slot)
    return len(dropped) - len(refilled)


def _slots_with_jobs(scheduler: Scheduler, limit_name: str, slots: list[datetime]) -> list:
    """Those of the slots that have a job, asked in one round trip: most slots of a long
    plan have none yet."""
    pipe = get_redis().pipeline(transaction=False)
    for slot in slots:
        job_id = slot_job_id(limit_name, slot)
        pipe.exists(Job.key_for(job_id))
        pipe.zscore(scheduler.scheduled_jobs_key, job_id)
    answers = pipe.execute()
    return [
        slot
        for slot, exists, due in zip(slots, answers[::2], answers[1::2])
        if exists or due is not None
    ]


def _drop_waiting_job(scheduler: Scheduler, job_id: str) -> bool:
    """Remove a job that waits in rq-scheduler or on a queue; a running one is left to
    find nothing to claim."""
    job = _job(job_id)
    if job is not None and job.get_status(refresh=False) == JobStatus.STARTED:
        return False
    scheduled = job_id in scheduler
    if scheduled:
        scheduler.cancel(job_id)
    if job is not None:
        job.delete(remove_from_queue=True)
    return scheduled or job is not None


def _schedule_slot_job(scheduler: Scheduler, limit_name: str, slot: datetime, due: datetime):
    # Aware UTC only: rq-scheduler reads a naive time as UTC, RQ as local time.
    scheduler.enqueue_at(
        due,
        SLOT_JOB,
        *_slot_job_args(limit_name, slot),
        job_id=slot_job_id(limit_name, slot),
        timeout=_slot_job_timeout(),
        job_result_ttl=RESULT_TTL_SECONDS,
    )


def run_slot_again(limit_name: str, slot: datetime, at: datetime) -> None:
    """Schedule a slot's job (the one running now, which is stepping aside) to run again
    at `at`, under its own id: reconcile sees the slot's job waiting. With Redis away
    nothing is scheduled, and reconcile queues the slot again."""
    try:
        _schedule_slot_job(get_scheduler(), limit_name, slot, at)
    except RedisError:
        log.warning("could not schedule slot %s of %s again; reconciling will", slot, limit_name)


def run_slot_now(limit_name: str, slot: datetime) -> bool:
    """Move a slot's job that rq-scheduler holds (it stepped aside) to the front of the
    queue; True if it was there. With Redis away it comes back at its time."""
    job_id = slot_job_id(limit_name, slot)
    try:
        job = _job(job_id)
        # Taken from the schedule only if still there: rq-scheduler may be moving it too.
        if job is None or not get_redis().zrem(get_scheduler().scheduled_jobs_key, job_id):
            return False
        get_queue(SLOTS_QUEUE).enqueue_job(job, at_front=True)
    except RedisError:
        log.warning("could not run slot %s of %s now; it runs at its time", slot, limit_name)
        return False
    return True


def add_slot_helper(limit_name: str, slot: datetime, most: int) -> bool:
    """Queue one more job for a limit's slot that is under way, ahead of later slots,
    unless `most` helpers are waiting or running already; True if one was added. With
    Redis away, none is: the slot job goes on alone."""
    try:
        return _add_slot_helper(limit_name, slot, most)
    except RedisError:
        log.warning("could not queue a helper for slot %s of %s", slot, limit_name)
        return False


def _add_slot_helper(limit_name: str, slot: datetime, most: int) -> bool:
    for number in range(1, most + 1):
        job_id = f"{slot_job_id(limit_name, slot)}-helper-{number}"
        if _job_status(job_id) in (*WAITING_STATUSES, JobStatus.STARTED):
            continue
        get_queue(SLOTS_QUEUE).enqueue(
            SLOT_JOB,
            *_slot_job_args(limit_name, slot),
            job_id=job_id,
            job_timeout=_slot_job_timeout(),
            result_ttl=RESULT_TTL_SECONDS,
            at_front=True,
        )
        return True
    return False


def _job(job_id: str) -> Job | None:
    try:
        return Job.fetch(job_id, connection=get_redis())
    except NoSuchJobError:
        return None


def _job_status(job_id: str) -> JobStatus | None:
    job = _job(job_id)
    return job.get_status(refresh=False) if job else None


def _waits_for_real(job: Job) -> bool:
    """Whether a job that RQ calls queued is on its queue. A worker pops a job before it
    marks it started: one that died in between (or between RQ's intermediate queue and
    the start) leaves a job marked queued that no queue holds. Such a job is taken for
    lost once it has been seen off its queue for LOST_AFTER_SECONDS, which a live worker
    never takes to start a job (three times the longest a new PostgreSQL connection may
    take it before the fork)."""
    if job.get_status(refresh=False) != JobStatus.QUEUED:
        return True
    redis = get_redis()
    if redis.lpos(get_queue(job.origin).key, job.id) is not None:
        return True
    marker = LOST_MARKER.format(job.id)
    if redis.set(marker, time.time(), nx=True, ex=LOST_MARKER_TTL_SECONDS):
        return True  # first seen off its queue: it may be starting this very moment
    first_seen = float(redis.get(marker) or time.time())
    return time.time() - first_seen < LOST_AFTER_SECONDS


def forget_lost_job(job_id: str) -> None:
    """Before a job is queued again under its id: drop the marker, and the copy that a
    worker's death may have left in RQ's intermediate queue (RQ would fail it later)."""
    redis = get_redis()
    redis.delete(LOST_MARKER.format(job_id))
    for name in ALL_QUEUES:
        redis.lrem(get_queue(name).intermediate_queue_key, 0, job_id)


def clean_abandoned_jobs() -> None:
    """Let RQ mark failed the jobs it calls started whose worker stopped beating (it
    died): RQ's workers do it only every few minutes."""
    for name in ALL_QUEUES:
        StartedJobRegistry(queue=get_queue(name)).cleanup()


def planning_is_queued(task_id: int) -> bool:
    return _is_queued(planning_job_id(task_id))


def replan_is_queued(event_id: int) -> bool:
    return _is_queued(replan_job_id(event_id))


def _is_queued(job_id: str) -> bool:
    job = _job(job_id)
    status = job.get_status(refresh=False) if job else None
    return (status in WAITING_STATUSES and _waits_for_real(job)) or status == JobStatus.STARTED


def _slot_job_timeout() -> int:
    # A slot job paces through its slot, then may meet slow processors: allow plenty.
    return current_app.config["SLOT_SECONDS"] * 3 + 300
