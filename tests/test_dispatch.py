"""Dispatch in one process: scheduling, slot jobs, outcomes, retries, reconcile."""

from datetime import UTC, datetime, timedelta

import pytest
from rq import Queue
from sqlalchemy import text

from service.claimers import new_claimer_id, release_dead_or_stuck
from service.claims import claim
from service.dispatch import SlotRun, run_slot
from service.extensions import db, get_redis
from service.models import IdTask
from service.outcomes import plan_retries, process_and_record, record_outcomes
from service.planner import EPOCH
from service.planning import WINDOW_LOCK_NAMESPACE, plan_stored_task
from service.processors import Failure
from service.queues import PLANNING_QUEUE, SLOTS_QUEUE
from service.reconcile import reconcile
from service.scheduling import EARLY_SECONDS, get_scheduler, schedule_slots, slot_job_id
from service.slots import slot_grid
from workers.processors import record_user

from .helpers import at, just_before_a_window, submit, times_processed

PAST = at("2026-01-05 08:59:50")  # planning "then" puts every slot in the past
FIRST_SLOT = at("2026-01-05 09:00")


def assignment_rows(task_id):
    return db.session.execute(
        text(
            "SELECT user_id, status, attempts, error, slot_start FROM assignments "
            "WHERE task_id = :t ORDER BY position"
        ),
        {"t": task_id},
    ).all()


@pytest.fixture
def rpm3(make_app):
    app = make_app(RPM=3, PACING=False, RETRY_BACKOFF_SECONDS=0)
    with app.app_context():
        yield app


def test_planning_schedules_one_job_per_slot_due_just_before_it(rpm3):
    future = just_before_a_window(timedelta(hours=2))
    task_id = submit(range(1, 8))
    plan_stored_task(task_id, now=future)
    task = db.session.get(IdTask, task_id)
    scheduler = get_scheduler()
    jobs = {job.id: when for job, when in scheduler.get_jobs(with_times=True)}
    slots = [task.first_slot + timedelta(minutes=m) for m in range(3)]
    assert set(jobs) == {slot_job_id(slot) for slot in slots}
    due = jobs[slot_job_id(slots[0])].replace(tzinfo=UTC)
    assert slots[0] - due == timedelta(seconds=EARLY_SECONDS // 1 + 1)  # whole seconds kept
    assert schedule_slots(slots) == 0  # scheduling again adds nothing
    assert len(list(scheduler.get_jobs())) == 3


def test_a_slot_job_processes_its_ids_and_records_users(rpm3):
    task_id = submit(range(1, 8))
    plan_stored_task(task_id, now=PAST)
    assert run_slot(FIRST_SLOT) == SlotRun(FIRST_SLOT, processed=3, handed_back=0)
    assert times_processed() == {1: 1, 2: 1, 3: 1}
    assert db.session.get(IdTask, task_id).status == "running"
    for minute in (1, 2):
        run_slot(FIRST_SLOT + timedelta(minutes=minute))
    task = db.session.get(IdTask, task_id)
    db.session.refresh(task)
    assert (task.status, task.done, task.pending, task.task_status) == ("done", 7, 0, True)
    assert {row.status for row in assignment_rows(task_id)} == {"done"}
    assert times_processed() == dict.fromkeys(range(1, 8), 1)
    slot = db.session.execute(
        text("SELECT load, done, failed, late FROM slots WHERE slot_start = :s"), {"s": FIRST_SLOT}
    ).one()
    assert tuple(slot) == (3, 3, 0, True)  # it ran long after its start


def test_users_received_by_ids_are_listed(rpm3):
    plan_stored_task(submit([41, 42]), now=PAST)
    run_slot(FIRST_SLOT)
    listed = rpm3.test_client().get("/users/").json
    assert {user["id"] for user in listed} == {41, 42}
    assert all(user["times_processed"] == 1 and user["last_processed_at"] for user in listed)


def test_running_a_slot_twice_processes_each_id_once(rpm3):
    plan_stored_task(submit(range(1, 4)), now=PAST)
    run_slot(FIRST_SLOT)
    assert run_slot(FIRST_SLOT).processed == 0
    assert times_processed() == {1: 1, 2: 1, 3: 1}


def test_a_failing_id_is_retried_in_a_later_slot_then_stays_failed(make_app):
    app = make_app(
        RPM=3,
        PACING=False,
        RETRY_BACKOFF_SECONDS=0,
        MAX_ATTEMPTS=2,
        SLOT_SECONDS=1,
        WINDOW_SLOTS=5,
        PLAN_LEAD_SECONDS=0.2,
        ID_PROCESSOR="tests.processors:fail_all",
    )
    first_slot = at("2026-01-05 08:59:51")  # the first open one-second slot at PAST
    with app.app_context():
        task_id = submit([5])
        plan_stored_task(task_id, now=PAST)
        run_slot(first_slot)
        (row,) = assignment_rows(task_id)
        assert (row.status, row.attempts, row.error) == ("retrying", 1, "downstream said no")
        queued = Queue(PLANNING_QUEUE, connection=get_redis()).job_ids
        assert any(job_id.startswith("plan-retries-") for job_id in queued)
        assert plan_retries() == 1
        (row,) = assignment_rows(task_id)
        assert row.status == "pending"
        assert row.slot_start > datetime.now(UTC)  # planned again, like any ID
        retry_job = slot_job_id(row.slot_start)
        assert (
            retry_job in get_scheduler()
            or retry_job in Queue(SLOTS_QUEUE, connection=get_redis()).job_ids
        )
        run_slot(row.slot_start)
        (row,) = assignment_rows(task_id)
        assert (row.status, row.attempts) == ("failed", 2)
        task = db.session.get(IdTask, task_id)
        assert (task.status, task.failed, task.task_status) == ("failed", 1, True)
    failed = app.test_client().get(f"/celery_ids_tasks/{task_id}/ids/?status=failed").json
    assert [(item["id"], item["attempts"], item["error"]) for item in failed] == [
        (5, 2, "downstream said no")
    ]


def test_a_failure_marked_final_is_not_retried(make_app):
    app = make_app(PACING=False, ID_PROCESSOR="tests.processors:fail_for_good")
    with app.app_context():
        task_id = submit([5])
        plan_stored_task(task_id, now=PAST)
        run_slot(FIRST_SLOT)
        (row,) = assignment_rows(task_id)
        assert (row.status, row.attempts, row.error) == ("failed", 1, "no such user downstream")


def test_a_processor_that_crashes_leaves_nothing_it_wrote(make_app):
    app = make_app(PACING=False, MAX_ATTEMPTS=1, ID_PROCESSOR="tests.processors:record_then_crash")
    with app.app_context():
        task_id = submit([5, 6])
        plan_stored_task(task_id, now=PAST)
        run_slot(FIRST_SLOT)
        assert times_processed() == {}
        assert {row.error for row in assignment_rows(task_id)} == {
            "RuntimeError: crashed after writing"
        }


def test_cancel_before_the_slot_runs_releases_the_ids(rpm3):
    task_id = submit(range(1, 4))
    plan_stored_task(task_id, now=PAST)
    rpm3.test_client().delete(f"/celery_ids_tasks/{task_id}/")
    assert run_slot(FIRST_SLOT).processed == 0
    assert times_processed() == {}


def test_reconcile_rebuilds_what_redis_lost(rpm3):
    soon = just_before_a_window(timedelta(minutes=5))  # well within the hour ahead
    planned = submit(range(1, 7))
    plan_stored_task(planned, now=soon)
    much_later = submit([20])
    plan_stored_task(much_later, now=soon + timedelta(hours=3))
    past = submit([9])
    plan_stored_task(past, now=PAST)
    waiting = submit([10])  # never planned: its planning job is lost too
    get_redis().flushall()

    outcome = reconcile()
    assert outcome == {
        "claims released": 0,
        "slot jobs added": 3,  # two soon, one past; the one hours ahead waits its turn
        "late slots": 1,
        "planning jobs added": 1,
        "retry planning queued": 0,
    }
    assert len(list(get_scheduler().get_jobs())) == 2
    assert Queue(SLOTS_QUEUE, connection=get_redis()).job_ids == [slot_job_id(FIRST_SLOT)]
    assert Queue(PLANNING_QUEUE, connection=get_redis()).job_ids == [f"plan-{waiting}"]
    assert db.session.execute(
        text("SELECT late FROM slots WHERE slot_start = :s"), {"s": FIRST_SLOT}
    ).scalar()
    assert reconcile()["slot jobs added"] == 0  # nothing twice


def test_reconcile_releases_claims_of_a_dead_worker(make_app):
    app = make_app(RPM=3, PACING=False, CLAIM_TIMEOUT_SECONDS=1)
    with app.app_context():
        task_id = submit(range(1, 4))
        plan_stored_task(task_id, now=PAST)
        db.session.execute(
            text(
                "UPDATE assignments SET status = 'running', claimed_at = now() - interval '1 hour'"
            )
        )
        db.session.commit()
        assert run_slot(FIRST_SLOT).processed == 0  # claimed by someone (dead)
        assert reconcile()["claims released"] == 3
        run_slot(FIRST_SLOT)
        assert times_processed() == {1: 1, 2: 1, 3: 1}


def test_reconcile_command_prints_what_it_did(rpm3):
    plan_stored_task(submit([1]), now=PAST)
    get_redis().flushall()
    result = rpm3.test_cli_runner().invoke(args=["plan", "reconcile"])
    assert result.exit_code == 0, result.output
    assert "slot jobs added: 1" in result.output
    assert "late slots: 1" in result.output


def test_a_scheduled_slot_job_runs_with_the_slot_as_only_argument(rpm3):
    future = just_before_a_window(timedelta(hours=2))
    task_id = submit([1])
    plan_stored_task(task_id, now=future)
    (job,) = get_scheduler().get_jobs()
    slot = db.session.get(IdTask, task_id).first_slot
    assert (job.func_name, job.args, job.kwargs) == (
        "workers.slots.run_slot",
        (slot.isoformat(),),
        {},
    )
    assert job.result_ttl == 3600


def test_new_ids_are_refused_once_a_claim_took_some(rpm3):
    task_id = submit(range(1, 7))
    plan_stored_task(task_id, now=PAST)
    db.session.execute(text("UPDATE assignments SET status = 'running' WHERE position = 0"))
    db.session.commit()  # a slot job claimed one; the task is still "scheduled"
    answer = rpm3.test_client().patch(f"/celery_ids_tasks/{task_id}/", json={"ids": [99]})
    assert answer.status_code == 409
    db.session.remove()
    assert len(assignment_rows(task_id)) == 6
    assert db.session.get(IdTask, task_id).planned == 6


def test_a_user_created_by_hand_after_processing_gets_a_free_id(rpm3):
    plan_stored_task(submit([41, 42]), now=PAST)
    run_slot(FIRST_SLOT)
    created = rpm3.test_client().post("/users/", json={"name": "by hand"})
    assert (created.status_code, created.json["id"]) == (201, 43)


def test_a_slow_worker_whose_claim_was_taken_over_processes_nothing(rpm3):
    task_id = submit([11, 12])
    plan_stored_task(task_id, now=PAST)
    slow, fast = new_claimer_id(), new_claimer_id()
    stale = claim(FIRST_SLOT, slow, 10).claims
    # The slow worker's claim timed out; reconcile gave the IDs back and another took them.
    assert release_dead_or_stuck(timedelta(0)) == 2
    fresh = claim(FIRST_SLOT, fast, 10).claims
    assert process_and_record(FIRST_SLOT, fast, fresh, record_user) == 2
    assert process_and_record(FIRST_SLOT, slow, stale, record_user) == 0
    assert times_processed() == {11: 1, 12: 1}
    assert {row.status for row in assignment_rows(task_id)} == {"done"}
    task = db.session.get(IdTask, task_id)
    db.session.refresh(task)
    assert (task.done, task.status) == (2, "done")


def test_a_cancelled_tasks_failed_ids_are_not_retried(make_app):
    app = make_app(RPM=3, PACING=False, MAX_ATTEMPTS=3)
    with app.app_context():
        task_id = submit([1, 2])
        plan_stored_task(task_id, now=PAST)
        claims = claim(FIRST_SLOT, new_claimer_id(), 10).claims
        app.test_client().delete(f"/celery_ids_tasks/{task_id}/")  # while they run
        record_outcomes(FIRST_SLOT, claims, {1: Failure("busy"), 2: Failure("busy")})
        rows = assignment_rows(task_id)
        assert {(row.status, row.error) for row in rows} == {("cancelled", "busy")}
        assert list(get_scheduler().get_jobs()) == []


def test_recording_failures_never_waits_for_a_planners_window_lock(make_app):
    app = make_app(
        RPM=3, PACING=False, RETRY_BACKOFF_SECONDS=0, ID_PROCESSOR="tests.processors:fail_all"
    )
    with app.app_context():
        task_id = submit([1, 2])
        plan_stored_task(task_id, now=PAST)
        grid = slot_grid()
        now = datetime.now(UTC)
        windows = [grid.window_of(now) + k * grid.window_length for k in range(3)]
        with db.engine.connect() as planner:  # a big task being planned into them
            for window in windows:
                number = (window - EPOCH) // grid.window_length % 2**31
                planner.execute(
                    text("SELECT pg_advisory_lock(:ns, :n)"),
                    {"ns": WINDOW_LOCK_NAMESPACE, "n": number},
                )
            db.session.execute(text("SET lock_timeout = '3s'"))  # waiting would fail
            assert run_slot(FIRST_SLOT).processed == 2
            assert {row.status for row in assignment_rows(task_id)} == {"retrying"}
            planner.execute(text("SELECT pg_advisory_unlock_all()"))
        db.session.remove()
        assert plan_retries() == 2
        assert {row.status for row in assignment_rows(task_id)} == {"pending"}
