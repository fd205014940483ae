"""Reconcile: rebuilding the schedule from PostgreSQL, handing back dead claims."""

import time
from datetime import timedelta

import psycopg
import pytest
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from sqlalchemy import text

from service import jobs as scheduling
from service.core import locks
from service.core.extensions import db, get_redis
from service.dispatch.reconcile import reconcile
from service.dispatch.slot_runs import run_slot
from service.jobs import PLANNING_QUEUE, SLOTS_QUEUE, get_queue, get_scheduler, slot_job_id
from service.limits import store as limits
from service.limits.store import DEFAULT
from service.planning.windows import plan_stored_task

from ..helpers import (
    FIRST_SLOT,
    PAST,
    add_limit,
    just_before_a_window,
    submit,
    times_processed,
)


def test_reconcile_rebuilds_what_redis_lost(rpm3):
    soon = just_before_a_window(timedelta(minutes=5))  # well within the two hours ahead
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
        "slot jobs beyond reach removed": 0,
        "planning jobs added": 1,
        "retry planning queued": 0,
        "re-plans queued": 0,
    }
    assert len(list(get_scheduler().get_jobs())) == 2
    assert Queue(SLOTS_QUEUE, connection=get_redis()).job_ids == [slot_job_id(DEFAULT, FIRST_SLOT)]
    assert Queue(PLANNING_QUEUE, connection=get_redis()).job_ids == [f"plan-{waiting}"]
    assert db.session.execute(
        text("SELECT late FROM slots WHERE slot_start = :s"), {"s": FIRST_SLOT}
    ).scalar()
    assert reconcile()["slot jobs added"] == 0  # nothing twice


def test_overdue_slots_are_queued_earliest_first(rpm3):
    # 9 IDs at RPM 3: three slots, all long past, planned in one go and then again by
    # reconcile once Redis lost them; each is queued at the front.
    plan_stored_task(submit(range(1, 10), overflow="defer"), now=PAST)
    overdue = [FIRST_SLOT + timedelta(minutes=m) for m in range(3)]
    in_order = [slot_job_id(DEFAULT, slot) for slot in overdue]
    assert get_queue(SLOTS_QUEUE).job_ids == in_order
    get_redis().flushall()
    assert reconcile()["slot jobs added"] == 3
    assert get_queue(SLOTS_QUEUE).job_ids == in_order


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
        assert run_slot(DEFAULT, FIRST_SLOT).processed == 0  # claimed by someone (dead)
        assert reconcile()["claims released"] == 3
        run_slot(DEFAULT, FIRST_SLOT)
        assert times_processed() == {1: 1, 2: 1, 3: 1}


def test_reconcile_command_prints_what_it_did(rpm3):
    plan_stored_task(submit([1]), now=PAST)
    get_redis().flushall()
    result = rpm3.test_cli_runner().invoke(args=["plan", "reconcile"])
    assert result.exit_code == 0, result.output
    assert "slot jobs added: 1" in result.output
    assert "late slots: 1" in result.output


def test_reconcile_never_adds_a_job_for_a_slot_whose_job_holds_its_lock(rpm3):
    task_id = submit([1, 2])
    plan_stored_task(task_id, now=PAST)
    get_redis().flushall()  # Redis forgot the job; the job itself still runs
    running = locks.slot_key(limits.find(DEFAULT).id, FIRST_SLOT)
    with psycopg.connect(rpm3.config["DATABASE_URL"], autocommit=True) as job:
        job.execute("SELECT pg_advisory_lock_shared(%s)", (running,))
        assert reconcile()["slot jobs added"] == 0
        # Its job ended. Unlocked here rather than by closing: a closed connection's
        # backend lets its locks go a moment later, not at once.
        job.execute("SELECT pg_advisory_unlock_shared(%s)", (running,))
        assert reconcile()["slot jobs added"] == 1  # the IDs left get one


def test_the_lock_of_a_running_slot_is_seen_whatever_its_limits_id(rpm3):
    # Past 16 bits, a limit's id used to spill into the namespace of the lock's key.
    db.session.execute(text("SELECT setval(pg_get_serial_sequence('limits', 'id'), 70000)"))
    db.session.commit()
    add_limit("wide", 3)
    wide = limits.find("wide").id
    assert wide == 70001
    plan_stored_task(submit([1, 2], limit="wide"), now=PAST)
    get_redis().flushall()
    running = locks.slot_key(wide, FIRST_SLOT)
    assert running >> 47 == locks.SLOT
    with psycopg.connect(rpm3.config["DATABASE_URL"], autocommit=True) as job:
        job.execute("SELECT pg_advisory_lock_shared(%s)", (running,))
        assert reconcile()["slot jobs added"] == 0
        job.execute("SELECT pg_advisory_unlock_shared(%s)", (running,))
        assert reconcile()["slot jobs added"] == 1


@pytest.mark.parametrize("left_in", ["nowhere", "intermediate queue"])
def test_a_job_a_worker_took_and_died_with_is_queued_again(rpm3, monkeypatch, left_in):
    task_id = submit([1, 2])
    plan_stored_task(task_id, now=PAST)  # its slot has passed: its job is on the queue
    queue = get_queue(SLOTS_QUEUE)
    job_id = slot_job_id(DEFAULT, FIRST_SLOT)
    assert queue.job_ids == [job_id]
    # A worker took it and died before starting it: RQ still calls it queued.
    if left_in == "nowhere":
        get_redis().lpop(queue.key)
    else:
        get_redis().lmove(queue.key, queue.intermediate_queue_key)
    assert Job.fetch(job_id, connection=get_redis()).get_status() == "queued"
    assert reconcile()["slot jobs added"] == 0  # it may be starting this very moment
    monkeypatch.setattr(scheduling, "LOST_AFTER_SECONDS", 0.0)
    assert reconcile()["slot jobs added"] == 1
    assert queue.job_ids == [job_id]
    assert get_redis().llen(queue.intermediate_queue_key) == 0  # RQ will not fail it later
    assert reconcile()["slot jobs added"] == 0  # now it waits on its queue for real


def test_a_planning_job_whose_worker_died_mid_job_is_queued_again(rpm3):
    task_id = submit([1, 2])  # stored, its planning job queued
    queue = get_queue(PLANNING_QUEUE)
    job = Job.fetch(f"plan-{task_id}", connection=get_redis())
    # A worker started it, then died: its heartbeat in RQ's registry has run out.
    queue.remove(job)
    job.set_status(JobStatus.STARTED)
    registry = StartedJobRegistry(queue=queue)
    get_redis().zadd(registry.key, {f"{job.id}:a-dead-execution": time.time() - 1})
    assert reconcile()["planning jobs added"] == 1
    assert queue.job_ids == [job.id]
