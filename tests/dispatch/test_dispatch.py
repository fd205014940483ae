"""Running a slot in one process: claims, processing, users recorded."""

from datetime import timedelta

from sqlalchemy import text

from service.core.extensions import db
from service.core.models import IdTask
from service.dispatch.slot_runs import run_slot
from service.limits.store import DEFAULT
from service.planning.windows import plan_stored_task

from ..helpers import (
    FIRST_SLOT,
    PAST,
    assignment_rows,
    submit,
    times_processed,
)


def test_a_slot_job_processes_its_ids_and_records_users(rpm3):
    task_id = submit(range(1, 8))
    plan_stored_task(task_id, now=PAST)
    run = run_slot(DEFAULT, FIRST_SLOT)
    assert (run.slot, run.claimed, run.done, run.failed) == (FIRST_SLOT, 3, 3, 0)
    assert run.handed_back == 0
    assert run.lateness_seconds > 86400  # the slot was months ago
    assert times_processed() == {1: 1, 2: 1, 3: 1}
    assert db.session.get(IdTask, task_id).status == "running"
    for minute in (1, 2):
        run_slot(DEFAULT, FIRST_SLOT + timedelta(minutes=minute))
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
    run_slot(DEFAULT, FIRST_SLOT)
    listed = rpm3.test_client().get("/users/").json
    assert {user["id"] for user in listed} == {41, 42}
    assert all(user["times_processed"] == 1 and user["last_processed_at"] for user in listed)


def test_running_a_slot_twice_processes_each_id_once(rpm3):
    plan_stored_task(submit(range(1, 4)), now=PAST)
    run_slot(DEFAULT, FIRST_SLOT)
    assert run_slot(DEFAULT, FIRST_SLOT).processed == 0
    assert times_processed() == {1: 1, 2: 1, 3: 1}


def test_cancel_before_the_slot_runs_releases_the_ids(rpm3):
    task_id = submit(range(1, 4))
    plan_stored_task(task_id, now=PAST)
    rpm3.test_client().delete(f"/celery_ids_tasks/{task_id}/")
    assert run_slot(DEFAULT, FIRST_SLOT).processed == 0
    assert times_processed() == {}


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
    run_slot(DEFAULT, FIRST_SLOT)
    created = rpm3.test_client().post("/users/", json={"name": "by hand"})
    assert (created.status_code, created.json["id"]) == (201, 43)
