"""The Redis side and the scheduler: one rq-scheduler job per slot, moved when due;
reconcile run by the scheduler itself."""

from datetime import UTC, datetime, timedelta

from rq import Queue
from rq_scheduler import Scheduler

from service.core.extensions import db, get_redis
from service.core.models import IdTask
from service.jobs import (
    EARLY_SECONDS,
    SLOTS_QUEUE,
    ServiceScheduler,
    get_scheduler,
    schedule_slots,
    slot_job_id,
)
from service.limits.store import DEFAULT
from service.planning.windows import plan_stored_task

from ..helpers import (
    just_before_a_window,
    submit,
)


def test_planning_schedules_one_job_per_slot_due_just_before_it(rpm3):
    future = just_before_a_window(timedelta(hours=2))
    task_id = submit(range(1, 8))
    plan_stored_task(task_id, now=future)
    task = db.session.get(IdTask, task_id)
    scheduler = get_scheduler()
    jobs = {job.id: when for job, when in scheduler.get_jobs(with_times=True)}
    slots = [task.first_slot + timedelta(minutes=m) for m in range(3)]
    assert set(jobs) == {slot_job_id(DEFAULT, slot) for slot in slots}
    due = jobs[slot_job_id(DEFAULT, slots[0])].replace(tzinfo=UTC)
    assert slots[0] - due == timedelta(seconds=EARLY_SECONDS // 1 + 1)  # whole seconds kept
    assert schedule_slots(DEFAULT, slots) == 0  # scheduling again adds nothing
    assert len(list(scheduler.get_jobs())) == 3


def test_a_scheduled_slot_job_runs_with_the_slot_and_its_limit_as_arguments(rpm3):
    future = just_before_a_window(timedelta(hours=2))
    task_id = submit([1])
    plan_stored_task(task_id, now=future)
    (job,) = get_scheduler().get_jobs()
    slot = db.session.get(IdTask, task_id).first_slot
    assert (job.func_name, job.args, job.kwargs) == (
        "workers.slots.run_slot",
        (slot.isoformat(), DEFAULT),
        {},
    )
    assert job.result_ttl == 3600


def test_scheduler_burst_moves_due_jobs_to_their_queue(app, runner):
    with app.app_context():
        scheduler = Scheduler(queue_name=SLOTS_QUEUE, connection=get_redis())
        scheduler.enqueue_at(datetime.now(UTC) - timedelta(seconds=1), print, "due")
        later = scheduler.enqueue_at(datetime.now(UTC) + timedelta(hours=1), print, "later")
    result = runner.invoke(args=["scheduler", "--burst"])
    assert result.exit_code == 0, result.output
    with app.app_context():
        assert Queue(SLOTS_QUEUE, connection=get_redis()).count == 1
        waiting = {job.id for job in Scheduler(connection=get_redis()).get_jobs()}
        assert waiting == {later.id}


def test_the_scheduler_reconciles_at_its_start(app, runner):
    with app.app_context():
        task_id = submit([1])
        plan_stored_task(task_id, now=datetime(2026, 1, 5, 8, 59, 50, tzinfo=UTC))
        get_redis().flushdb()  # the slot's job and the planning job are lost
    assert runner.invoke(args=["scheduler", "--burst"]).exit_code == 0
    with app.app_context():
        assert Queue(SLOTS_QUEUE, connection=get_redis()).job_ids == [
            "slot-default-20260105T090000"
        ]


def test_the_scheduler_reconciles_every_interval_between_its_polls(app):
    runs = []
    with app.app_context():
        scheduler = ServiceScheduler(
            queue_name=SLOTS_QUEUE,
            connection=get_redis(),
            maintenance=lambda after_outage: runs.append(after_outage),
            maintenance_seconds=3600,
        )
        scheduler.enqueue_jobs()
        scheduler.enqueue_jobs()  # its next poll, long before the next run is due
    assert runs == [False]


def scheduled_slot_jobs() -> set[str]:
    return {job.id for job in get_scheduler().get_jobs()}


def test_a_slot_left_without_pending_ids_loses_its_job(rpm3, client):
    future = just_before_a_window(timedelta(hours=2))
    alone = submit(range(1, 6))  # 1-3 in the first slot, 4-5 in the second
    plan_stored_task(alone, now=future)
    shared = submit([6])  # joins 4 and 5 in the second slot
    plan_stored_task(shared, now=future)
    first = db.session.get(IdTask, alone).first_slot
    second = first + timedelta(minutes=1)
    db.session.commit()
    both = {slot_job_id(DEFAULT, first), slot_job_id(DEFAULT, second)}
    assert scheduled_slot_jobs() == both

    assert client.delete(f"/celery_ids_tasks/{alone}/").status_code == 204
    assert scheduled_slot_jobs() == {slot_job_id(DEFAULT, second)}  # 6 still waits there

    # New IDs re-plan the task: the slot it held, now empty, loses its job too.
    changed = client.patch(f"/celery_ids_tasks/{shared}/", json={"ids": [7]})
    assert changed.status_code == 200
    assert scheduled_slot_jobs() == set()
    queued = Queue("planning", connection=get_redis()).job_ids
    assert queued[-1] == f"plan-{shared}"  # its new plan brings its new slots' jobs
