"""Work that must not wait behind other work. One slot of a limit hands out the limit's
turns at a time: a slot job that finds another slot of its limit doing so steps aside,
giving its worker up, and comes back when the slots before it are expected to be done,
or as soon as the one leading ends; a helper of the slot leading joins it. So a limit's
backlog of late slots holds one worker, and another limit's slot on time finds one free.
And the planning lane plans a task while every other worker paces a slot."""

import time
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from service.core import locks
from service.core.config import HTTP_PROCESSOR
from service.core.extensions import db
from service.core.models import TaskStatus
from service.dispatch.slot_runs import run_slot
from service.jobs import SLOTS_QUEUE, get_queue, get_scheduler, run_slot_again, slot_job_id
from service.limits.store import DEFAULT
from service.planning.windows import plan_stored_task

from ..downstream import Record, Server
from ..helpers import add_limit, limit_id, submit
from ..processes import start, stop, wait_until


@pytest.fixture
def two_second_slots(make_app):
    """10 IDs a 2-s slot; three slots planned, all begun."""
    app = make_app(SLOT_SECONDS=2, WINDOW_SLOTS=5, PLAN_LEAD_SECONDS=0.5, RPM=10)
    with app.app_context():
        task_id = submit(range(1, 31))
        plan_stored_task(task_id, now=datetime.now(UTC) - timedelta(seconds=30))
        yield slots_of(task_id)


def slots_of(task_id: int) -> list[datetime]:
    return list(
        db.session.scalars(
            text("SELECT DISTINCT slot_start FROM assignments WHERE task_id = :t ORDER BY 1"),
            {"t": task_id},
        )
    )


def pending_in(slot: datetime) -> int:
    return db.session.execute(
        text("SELECT count(*) FROM assignments WHERE slot_start = :s AND status = 'pending'"),
        {"s": slot},
    ).scalar()


@contextmanager
def another_job_holding(*keys: int, shared: bool = False, wait: bool = True):
    """A connection of another job holding an advisory lock (two keys, or one); yields
    whether it got it. Closed for good at the end, not returned to the pool: that is
    what drops its locks."""
    connection = db.engine.connect()
    take = "pg_advisory_lock" if wait else "pg_try_advisory_lock"
    take += "_shared" if shared else ""
    placeholders = ", ".join(f":k{n}" for n in range(len(keys)))
    try:
        taken = connection.execute(
            text(f"SELECT {take}({placeholders})"), {f"k{n}": key for n, key in enumerate(keys)}
        ).scalar()
        connection.commit()
        yield taken is not False
    finally:
        connection.invalidate()
        connection.close()


def due_in(job_id: str) -> float | None:
    """Seconds until rq-scheduler moves the job, or None if it does not hold it."""
    for job, due in get_scheduler().get_jobs(with_times=True):
        if job.id == job_id:
            return due.replace(tzinfo=UTC).timestamp() - datetime.now(UTC).timestamp()
    return None


def test_a_slot_steps_aside_while_another_of_its_limit_leads(two_second_slots):
    first, second, third = two_second_slots
    with another_job_holding(locks.LIMIT_RUNNER, limit_id()):
        run = run_slot(DEFAULT, third)
    assert run.stepped_aside and run.claimed == 0
    assert pending_in(third) == 10  # nothing claimed, nothing lost
    # Back when the 20 IDs of the two slots before it have had their turns: 2 slots, 4 s
    # (rq-scheduler keeps whole seconds, so up to one less).
    assert 2.5 < due_in(slot_job_id(DEFAULT, third)) <= 4.1
    # Once no other slot leads, it runs.
    again = run_slot(DEFAULT, third)
    assert (again.stepped_aside, again.done) == (False, 10)


def test_a_slot_that_steps_aside_first_comes_back_after_the_shortest_wait(two_second_slots):
    first, _, _ = two_second_slots
    with another_job_holding(locks.LIMIT_RUNNER, limit_id()):
        assert run_slot(DEFAULT, first).stepped_aside
    assert 0.5 < due_in(slot_job_id(DEFAULT, first)) <= 2.1  # nothing is before it: 2 s


def test_a_helper_joins_the_run_of_its_own_slot(two_second_slots):
    first, _, _ = two_second_slots
    # The slot's first job: it leads the limit and holds the slot's shared lock.
    with (
        another_job_holding(locks.LIMIT_RUNNER, limit_id()),
        another_job_holding(locks.slot_key(limit_id(), first), shared=True),
    ):
        run = run_slot(DEFAULT, first)
    assert (run.stepped_aside, run.done) == (False, 10)


def test_the_slot_leading_hands_the_lead_to_the_earliest_one_that_stepped_aside(
    two_second_slots,
):
    first, second, third = two_second_slots
    later = datetime.now(UTC) + timedelta(seconds=30)
    for slot in (third, second):  # both stepped aside
        run_slot_again(DEFAULT, slot, later)
    assert run_slot(DEFAULT, first).done == 10
    queued = get_queue(SLOTS_QUEUE).job_ids
    assert queued[:1] == [slot_job_id(DEFAULT, second)]  # at the front, at once
    assert due_in(slot_job_id(DEFAULT, second)) is None
    assert due_in(slot_job_id(DEFAULT, third)) is not None  # its turn comes after
    # And the lead is free again: another job can take it at once.
    with another_job_holding(locks.LIMIT_RUNNER, limit_id(), wait=False) as taken:
        assert taken


@pytest.mark.slow
def test_a_backlog_of_late_slots_never_delays_another_limits_slot_on_time(make_app):
    # Limit "backlog": 60 IDs in 2-s slots that all began 20 s ago, 8 s of turns or
    # more. Limit "on-time": 10 IDs in one slot 4 s from now. Two workers: with every
    # late slot holding a worker while it waits for the limit's turns, the on-time slot
    # would wait for one until the backlog's last slot began.
    settings = {"SLOT_SECONDS": 2, "WINDOW_SLOTS": 5, "PLAN_LEAD_SECONDS": 0.5, "RPM": 10}
    record = Record(latency=0.2)
    with make_app(**settings).app_context(), Server(record) as url:
        add_limit("backlog", 10, HTTP_PROCESSOR, url=url)
        add_limit("on-time", 10, HTTP_PROCESSOR, url=url)
        late_task = submit(range(1, 61), limit="backlog")
        plan_stored_task(late_task, now=datetime.now(UTC) - timedelta(seconds=20))
        processes = [start(["worker"], settings) for _ in range(2)]
        processes.append(start(["scheduler"], settings))
        try:
            on_time_task = submit(range(1001, 1011), limit="on-time")
            plan_stored_task(on_time_task, now=datetime.now(UTC) + timedelta(seconds=3.5))
            wait_until(
                lambda: (
                    db.session.execute(
                        text("SELECT count(*) FROM assignments WHERE status = 'done'")
                    ).scalar()
                    == 70
                ),
                60,
                "every ID to be done",
            )
        finally:
            stop(processes)
        (slot,) = slots_of(on_time_task)
        backlog_slots = len(slots_of(late_task))
    on_time = [arrived - slot.timestamp() for arrived, user, _, _ in record.calls if user > 1000]
    assert len(on_time) == 10
    assert all(0 <= offset < 2 for offset in on_time), sorted(on_time)
    late = sorted(arrived for arrived, user, _, _ in record.calls if user <= 1000)
    assert len(late) == 60
    # The backlog still drains at its limit's pace, one slot after another, each over
    # about its 2 s: never as a burst.
    assert late[-1] - late[0] > (backlog_slots - 1) * 2, (backlog_slots, late[-1] - late[0])


@pytest.mark.slow
def test_the_planning_lane_plans_a_task_while_every_worker_paces_a_slot(make_app):
    # Two limits, each a 4-s slot of 20 IDs that holds a worker to its end; two workers
    # and the planning lane, as `make run` and docker-compose run them.
    settings = {"SLOT_SECONDS": 4, "WINDOW_SLOTS": 5, "PLAN_LEAD_SECONDS": 0.5, "RPM": 20}
    record = Record(latency=0.2)
    with make_app(**settings).app_context(), Server(record) as url:
        for name, first in (("a", 1), ("b", 101)):
            add_limit(name, 20, HTTP_PROCESSOR, url=url)
            task = submit(range(first, first + 20), limit=name)
            plan_stored_task(task, now=datetime.now(UTC) + timedelta(seconds=2))
        processes = [start(["worker"], settings) for _ in range(2)]
        processes.append(start(["worker", "--queue", "planning"], settings))
        processes.append(start(["scheduler"], settings))
        try:
            # Both slots under way: every worker but the lane is pacing one.
            wait_until(
                lambda: {user // 100 for _, user, _, _ in record.calls} == {0, 1}, 30, "both slots"
            )
            asked_at = time.time()
            task_id = submit(range(1001, 1011))
            wait_until(lambda: task_status(task_id) not in WAITING, 10, "the plan")
            planned_after = time.time() - asked_at
            calls_by_then = len(record.calls)
        finally:
            stop(processes)
    assert calls_by_then < 40, calls_by_then  # the two slots were still being paced
    assert planned_after < 2.0, planned_after  # not after a slot's end, up to 4 s away


WAITING = (TaskStatus.RECEIVED, TaskStatus.PLANNING)


def task_status(task_id: int) -> str:
    return db.session.execute(
        text("SELECT status FROM id_tasks WHERE id = :t"), {"t": task_id}
    ).scalar()
