"""Several limits in one deployment: each plans into slots, windows and locks of its own,
runs its own slot jobs, and is reconciled on its own; two never share capacity."""

import threading
from collections import Counter
from datetime import timedelta

import pytest
from rq import Queue
from sqlalchemy import text

from service.core import locks
from service.core.extensions import db, get_redis
from service.dispatch.reconcile import reconcile
from service.dispatch.slot_runs import run_slot
from service.jobs import SLOTS_QUEUE
from service.planning.planner import EPOCH
from service.planning.preview import preview_plan
from service.planning.windows import plan_stored_task

from ..helpers import (
    FIRST_SLOT,
    PAST,
    add_limit,
    at,
    limit_id,
    loads,
    minute,
    set_load,
    slots_by_id,
    submit,
    times_processed,
)

NOW = at("2030-01-07 10:05:20")
WINDOW = at("2030-01-07 10:00")
NEXT_HOUR = at("2030-01-07 11:00")


def plan_at_once(app, task_ids: list[int]) -> None:
    """Plan the tasks in threads of their own, released together."""
    barrier = threading.Barrier(len(task_ids))
    failures = []

    def plan(task_id: int) -> None:
        with app.app_context():
            barrier.wait(10)
            try:
                plan_stored_task(task_id, now=NOW)
            except Exception as exc:  # noqa: BLE001 - reported by the test below
                failures.append(exc)

    threads = [threading.Thread(target=plan, args=(task_id,)) for task_id in task_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert failures == []


@pytest.mark.parametrize("overflow", ["defer", "spread"])
def test_two_limits_planned_into_one_window_at_once_each_keep_their_capacity(rpm5, overflow):
    add_limit("mail", 4)
    add_limit("partner", 2)
    tasks = {
        name: submit(range(1, 31), overflow, limit=name) for name in ("mail", "partner", "default")
    }
    plan_at_once(rpm5, list(tasks.values()))
    planned = {name: loads(WINDOW, NEXT_HOUR, name) for name in tasks}
    # Nine open slots (10:06 to 10:14) for each limit, as if it were alone.
    assert list(planned["mail"].values()) == [4] * 7 + [2]
    assert list(planned["default"].values()) == [5] * 6
    if overflow == "defer":  # 18 below RPM here, the rest in the next window
        assert list(planned["partner"].values()) == [2] * 15
    else:  # 18 below RPM, then 12 spread over the nine slots
        assert list(planned["partner"].values()) == [4] * 3 + [3] * 6
    for name, task_id in tasks.items():
        assert min(slots_by_id(task_id).values()) == minute(6), name


def test_a_limit_plans_while_another_limits_window_is_locked(rpm5):
    add_limit("mail", 4)
    task_id = submit([1, 2, 3], limit="mail")
    window = (WINDOW - EPOCH) // timedelta(minutes=15)
    with db.engine.connect() as planner:  # a planner of the default limit, mid-window
        planner.execute(
            text("SELECT pg_advisory_xact_lock(:key)"),
            {"key": locks.window_key(limit_id(), window)},
        )
        db.session.execute(text("SET lock_timeout = '2s'"))
        plan_stored_task(task_id, now=NOW)
        planner.rollback()
    assert set(slots_by_id(task_id).values()) == {minute(6)}


@pytest.mark.parametrize("name", ["default", "partner"])
def test_a_preview_is_the_plan_a_submit_gets_in_its_limit(rpm5, name):
    add_limit("partner", 3)
    set_load(minute(6), 2, "partner")
    set_load(minute(7), 4, "default")
    ids = [*range(1, 40), 5]
    preview = preview_plan(ids, "spread", now=NOW, limit=name)
    task_id = submit(ids, limit=name)
    plan_stored_task(task_id, now=NOW)
    added = Counter(slots_by_id(task_id).values())
    after = loads(WINDOW, NEXT_HOUR, name)
    assert (preview["limit"], preview["rpm"]) == (name, {"default": 5, "partner": 3}[name])
    assert [(s["start"], s["added"], s["load"]) for s in preview["slots"]] == [
        (slot, added[slot], after[slot]) for slot in sorted(added)
    ]


def test_each_limits_slot_job_runs_only_its_own_ids(rpm3):
    add_limit("mail", 3)
    plan_stored_task(submit([1, 2], limit="mail"), now=PAST)
    plan_stored_task(submit([3, 4]), now=PAST)
    run = run_slot("mail", FIRST_SLOT)
    assert (run.limit, run.done) == ("mail", 2)
    assert times_processed() == {1: 1, 2: 1}
    assert run_slot("default", FIRST_SLOT).done == 2
    assert times_processed() == {1: 1, 2: 1, 3: 1, 4: 1}
    done = db.session.execute(text("SELECT limit_id, done FROM slots ORDER BY limit_id")).all()
    assert sorted(tuple(row) for row in done) == sorted(
        [(limit_id("mail"), 2), (limit_id("default"), 2)]
    )


def test_a_job_queued_before_limits_runs_its_slot_of_the_default(rpm3):
    from workers.slots import run_slot as slot_job

    plan_stored_task(submit([1, 2]), now=PAST)
    assert slot_job(FIRST_SLOT.isoformat()).done == 2


def test_reconcile_gives_each_limits_slots_their_own_jobs(rpm3):
    add_limit("mail", 3)
    plan_stored_task(submit([1], limit="mail"), now=PAST)
    plan_stored_task(submit([2]), now=PAST)
    get_redis().flushall()
    assert reconcile()["slot jobs added"] == 2
    queued = Queue(SLOTS_QUEUE, connection=get_redis()).job_ids
    assert sorted(queued) == ["slot-default-20260105T090000", "slot-mail-20260105T090000"]
    late = db.session.execute(text("SELECT count(*) FROM slots WHERE late")).scalar()
    assert late == 2


def test_the_slots_answer_and_the_plan_command_show_one_limit(rpm3):
    add_limit("mail", 7)
    plan_stored_task(submit([1, 2], limit="mail"), now=NOW)
    client = rpm3.test_client()
    plan = client.get("/slots/?limit=mail&from=2030-01-07T10:00:00Z").json
    assert (plan["limit"], plan["rpm"]) == ("mail", 7)
    assert plan["windows"][0]["load"] == 2
    assert client.get("/slots/?from=2030-01-07T10:00:00Z").json["windows"][0]["load"] == 0
    shown = rpm3.test_cli_runner().invoke(
        args=["plan", "show", "--at", "2030-01-07 10:05", "--limit", "mail"]
    )
    assert shown.exit_code == 0, shown.output
    assert "RPM 7" in shown.output and "2 IDs planned" in shown.output
