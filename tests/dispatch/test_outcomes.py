"""Outcomes and retries: done, failed, retried in a later slot; only held claims count."""

from datetime import UTC, datetime, timedelta

from rq import Queue
from sqlalchemy import text

from service.core import locks
from service.core.extensions import db, get_redis
from service.core.models import IdTask
from service.dispatch.claimers import new_claimer_id, release_dead_or_stuck
from service.dispatch.claims import claim
from service.dispatch.outcomes import process_and_record, record_outcomes
from service.dispatch.slot_runs import run_slot
from service.jobs import SLOTS_QUEUE, get_scheduler, slot_job_id
from service.limits.store import DEFAULT, SlotOfLimit
from service.planning.planner import EPOCH
from service.planning.reading import slot_grid
from service.planning.retries import plan_retries
from service.planning.windows import plan_stored_task
from service.processors.builtin import record_user
from service.processors.contract import MAX_ERROR_CHARS, Failure

from ..helpers import (
    FIRST_SLOT,
    PAST,
    assignment_rows,
    at,
    limit_id,
    submit,
    times_processed,
)


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
        run_slot(DEFAULT, first_slot)
        (row,) = assignment_rows(task_id)
        assert (row.status, row.attempts, row.error) == ("retrying", 1, "downstream said no")
        queued = Queue(SLOTS_QUEUE, connection=get_redis()).job_ids
        assert queued[0].startswith("plan-retries-")  # ahead of slot jobs
        assert plan_retries() == 1
        (row,) = assignment_rows(task_id)
        assert row.status == "pending"
        assert row.slot_start > datetime.now(UTC)  # planned again, like any ID
        retry_job = slot_job_id(DEFAULT, row.slot_start)
        assert (
            retry_job in get_scheduler()
            or retry_job in Queue(SLOTS_QUEUE, connection=get_redis()).job_ids
        )
        run_slot(DEFAULT, row.slot_start)
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
        run_slot(DEFAULT, FIRST_SLOT)
        (row,) = assignment_rows(task_id)
        assert (row.status, row.attempts, row.error) == ("failed", 1, "no such user downstream")


def test_a_processor_that_crashes_leaves_nothing_it_wrote(make_app):
    app = make_app(PACING=False, MAX_ATTEMPTS=1, ID_PROCESSOR="tests.processors:record_then_crash")
    with app.app_context():
        task_id = submit([5, 6])
        plan_stored_task(task_id, now=PAST)
        run_slot(DEFAULT, FIRST_SLOT)
        assert times_processed() == {}
        assert {row.error for row in assignment_rows(task_id)} == {
            "RuntimeError: crashed after writing"
        }


def first_slot_of_default() -> SlotOfLimit:
    return SlotOfLimit(limit_id(), DEFAULT, FIRST_SLOT)


def test_a_slow_worker_whose_claim_was_taken_over_processes_nothing(rpm3):
    task_id = submit([11, 12])
    plan_stored_task(task_id, now=PAST)
    slow, fast = new_claimer_id(), new_claimer_id()
    stale = claim(limit_id(), FIRST_SLOT, slow, 10).claims
    # The slow worker's claim timed out; reconcile gave the IDs back and another took them.
    assert release_dead_or_stuck(timedelta(0)) == 2
    fresh = claim(limit_id(), FIRST_SLOT, fast, 10).claims
    assert process_and_record(first_slot_of_default(), fast, fresh, record_user).processed == 2
    assert process_and_record(first_slot_of_default(), slow, stale, record_user).processed == 0
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
        claims = claim(limit_id(), FIRST_SLOT, new_claimer_id(), 10).claims
        app.test_client().delete(f"/celery_ids_tasks/{task_id}/")  # while they run
        record_outcomes(first_slot_of_default(), claims, {1: Failure("busy"), 2: Failure("busy")})
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
                    {"ns": locks.WINDOW, "n": number},
                )
            db.session.execute(text("SET lock_timeout = '3s'"))  # waiting would fail
            assert run_slot(DEFAULT, FIRST_SLOT).processed == 2
            assert {row.status for row in assignment_rows(task_id)} == {"retrying"}
            planner.execute(text("SELECT pg_advisory_unlock_all()"))
        db.session.remove()
        assert plan_retries() == 2
        assert {row.status for row in assignment_rows(task_id)} == {"pending"}


def test_a_stored_error_text_is_bounded(make_app):
    app = make_app(PACING=False, MAX_ATTEMPTS=1, ID_PROCESSOR="tests.processors:fail_at_length")
    with app.app_context():
        task_id = submit([5])
        plan_stored_task(task_id, now=PAST)
        run_slot(DEFAULT, FIRST_SLOT)
        (row,) = assignment_rows(task_id)
    assert row.status == "failed"
    assert len(row.error) <= MAX_ERROR_CHARS < 10_000
    assert row.error.startswith("xxx") and row.error.endswith("…")


def test_a_processors_unexpected_answer_fails_its_ids_not_the_slot(make_app):
    app = make_app(PACING=False, MAX_ATTEMPTS=1, ID_PROCESSOR="tests.processors:answer_a_list")
    with app.app_context():
        task_id = submit([5, 6])
        plan_stored_task(task_id, now=PAST)
        run = run_slot(DEFAULT, FIRST_SLOT)
        rows = assignment_rows(task_id)
    assert (run.claimed, run.failed) == (2, 2)
    assert {row.status for row in rows} == {"failed"}
    assert {row.error for row in rows} == {
        "the processor answered a list, not a mapping of the IDs that failed"
    }
