"""rq-scheduler holds the jobs of the slots starting within SCHEDULE_AHEAD_MINUTES only;
reconcile adds the next ones as time passes, well before their slots start."""

import time
from datetime import UTC, datetime, timedelta

from rq_scheduler import Scheduler
from sqlalchemy import text

from service.core.extensions import db, get_redis
from service.core.models import IdTask
from service.dispatch.reconcile import reconcile
from service.jobs import (
    ALL_QUEUES,
    EARLY_SECONDS,
    ensure_slot_job,
    get_queue,
    get_scheduler,
    slot_job_id,
)
from service.limits.store import DEFAULT
from service.planning import horizon
from service.planning import resume as pausing
from service.planning.windows import plan_stored_task
from service.tasks.services import submit_task

from ..helpers import submit

AHEAD = timedelta(minutes=120)
IDS = 100_000


def jobs_in_redis() -> dict[str, int]:
    """What Redis holds for slots: rq-scheduler's schedule, each queue, the job hashes."""
    redis = get_redis()
    held = {"scheduled": redis.zcard(Scheduler.scheduled_jobs_key)}
    held.update({name: get_queue(name).count for name in ALL_QUEUES})
    held["job hashes"] = sum(1 for _ in redis.scan_iter("rq:job:slot-*", count=1000))
    return held


def scheduled_slots() -> dict[datetime, datetime]:
    """Each slot that rq-scheduler holds a job for, and when the job is due."""
    return {
        datetime.fromisoformat(job.args[0]): due.replace(tzinfo=UTC)
        for job, due in get_scheduler().get_jobs(with_times=True)
    }


def pending_slots(task_id: int) -> list[datetime]:
    return sorted(
        db.session.scalars(
            text("SELECT DISTINCT slot_start FROM assignments WHERE task_id = :t"),
            {"t": task_id},
        )
    )


def test_a_plan_of_a_month_keeps_two_hours_of_jobs_and_reconcile_adds_the_next(make_app):
    # 100,000 slots of 30 s at RPM 1: 35 days of them, within a 60-day horizon. Windows
    # stay the hour's quarters (30 slots), each locked by the plan until it commits.
    app = make_app(RPM=1, MAX_PLAN_DAYS=60, SLOT_SECONDS=30, WINDOW_SLOTS=30)
    with app.app_context():
        started = time.perf_counter()
        task = submit_task("a month", range(1, IDS + 1), "defer", admit=horizon.admit)
        now = datetime.now(UTC)
        outcome = plan_stored_task(task.id, now=now)
        took = time.perf_counter() - started
        slots = pending_slots(task.id)
        held = jobs_in_redis()
        assert (outcome.planned, len(slots)) == (IDS, IDS)
        assert outcome.last_slot - now > timedelta(days=34)
        # Two hours of 30-s slots: 240 jobs (239 when the lead of 3 s closes the next
        # slot), not 100,000.
        near = [slot for slot in slots if slot <= now + AHEAD]
        assert len(near) in (239, 240)
        # On a busy machine planning may take long enough that the first slot is due
        # when its job is made: it then goes straight to its queue.
        queued = held["slots"]
        assert queued <= 1, held
        expected = {
            "scheduled": len(near) - queued,
            "slots": queued,
            "planning": 1,
            "job hashes": len(near),
        }
        assert held == expected, f"Redis holds {held} after planning {IDS} slots"
        on_queue = set(near[:queued])
        assert set(scheduled_slots()) | on_queue == set(near)
        assert took < 10, f"submitting and planning {IDS} slots took {took:.1f} s"
        # Far slots without a job are no loss: reconcile at once adds nothing.
        assert reconcile(now=now)["slot jobs added"] == 0

        # An hour later (the jobs of that hour would have run), every slot within two
        # hours has its job; then, run after run, each new job comes two hours (less a
        # run's interval) before its slot starts, and is due before it does.
        clock = now + timedelta(hours=1)
        reconcile(now=clock)
        within = {slot for slot in slots if slot <= clock + AHEAD}
        assert set(scheduled_slots()) | on_queue == within
        interval = timedelta(seconds=app.config["RECONCILE_INTERVAL_SECONDS"])
        for _ in range(6):
            known, clock = scheduled_slots(), clock + interval
            added = reconcile(now=clock)["slot jobs added"]
            due = scheduled_slots()
            new = {slot: when for slot, when in due.items() if slot not in known}
            assert len(new) == added
            assert set(due) | on_queue == {slot for slot in slots if slot <= clock + AHEAD}
            assert all(
                when < slot and slot - clock > AHEAD - interval for slot, when in new.items()
            )
        held = jobs_in_redis()
        ahead_of_the_clock = sum(1 for slot in due if slot > clock)
        assert ahead_of_the_clock <= 240, f"Redis holds {held} an hour and a minute later"
        print(f"\n{IDS} slots planned in {took:.2f} s; Redis holds {held}")
    # The plan page says why the later slots have no job yet.
    page = " ".join(app.test_client().get("/plan").get_data(as_text=True).split())
    assert "the slots starting within the next 120 minutes" in page


def test_jobs_scheduled_for_far_slots_are_removed_and_come_back_in_reach(rpm3):
    now = datetime.now(UTC)
    task_id = submit([1], not_before=now + timedelta(hours=5))
    plan_stored_task(task_id, now=now)
    slot = db.session.get(IdTask, task_id).first_slot
    assert scheduled_slots() == {}  # five hours ahead: no job yet
    # As an earlier version scheduled every slot at planning:
    ensure_slot_job(get_scheduler(), DEFAULT, slot)
    assert reconcile(now=now)["slot jobs beyond reach removed"] == 1
    assert scheduled_slots() == {}
    assert not get_redis().exists(f"rq:job:{slot_job_id(DEFAULT, slot)}")
    later = reconcile(now=slot - AHEAD + timedelta(seconds=10))
    assert (later["slot jobs added"], later["slot jobs beyond reach removed"]) == (1, 0)
    assert scheduled_slots() == {slot: slot - timedelta(seconds=int(EARLY_SECONDS) + 1)}


def test_resuming_a_limit_gives_jobs_to_its_slots_that_came_within_reach(rpm3):
    now = datetime.now(UTC)
    pausing.pause(DEFAULT)
    task_id = submit([1, 2, 3, 4], not_before=now + timedelta(hours=3))
    plan_stored_task(task_id, now=now)
    assert scheduled_slots() == {}  # three hours ahead when planned
    # Hours later, reconcile having skipped the paused limit, it is resumed.
    later = now + timedelta(hours=2)
    assert pausing.resume(DEFAULT, now=later) == 0
    slots = pending_slots(task_id)
    assert set(scheduled_slots()) == set(slots)
