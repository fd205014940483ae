"""Pausing a limit stops its slots; resuming plans its overdue IDs again from then on,
by the usual rules, so that a resume never becomes a burst."""

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from service.core.extensions import db, get_redis
from service.core.models import IdTask
from service.dispatch.reconcile import reconcile
from service.dispatch.slot_runs import run_slot
from service.planning import resume as pausing
from service.planning.preview import preview_plan
from service.planning.windows import plan_stored_task

from ..helpers import (
    FIRST_SLOT,
    PAST,
    add_limit,
    assignment_rows,
    at,
    loads,
    slots_by_id,
    submit,
    times_processed,
)

RESUMED = at("2026-01-05 09:05:20")  # 09:00 to 09:05 have passed; 09:06 to 09:14 are open
HOUR = (FIRST_SLOT, FIRST_SLOT + timedelta(hours=1))


def slot(m: int):
    return FIRST_SLOT + timedelta(minutes=m)


@pytest.fixture
def partner(rpm3):
    """A limit of RPM 3 holding a task of 30 IDs planned three a slot, 09:00 to 09:09."""
    add_limit("partner", 3)
    task_id = submit(range(1, 31), limit="partner")
    plan_stored_task(task_id, now=PAST)
    return task_id


def test_a_paused_limits_slots_process_nothing_and_its_resume_plans_them_from_then(partner):
    pausing.pause("partner")
    runs = [run_slot("partner", slot(m)) for m in range(6)]
    assert [(run.paused, run.claimed) for run in runs] == [(True, 0)] * 6
    assert times_processed() == {}
    assert {row.status for row in assignment_rows(partner)} == {"pending"}
    # What planning the 18 overdue IDs afresh at the moment of resuming would give.
    expected = preview_plan(range(1, 19), now=RESUMED, limit="partner")["slots"]

    assert pausing.resume("partner", now=RESUMED) == 18

    moved = Counter(s for user_id, s in slots_by_id(partner).items() if user_id <= 18)
    assert moved == {s["start"]: s["added"] for s in expected}
    # 09:06 to 09:09 hold three already: fill 09:10 to 09:14, then spread from 09:06.
    assert moved == {
        **dict.fromkeys(map(slot, range(10, 15)), 3),
        **dict.fromkeys(map(slot, (6, 7, 8)), 1),
    }
    assert min(moved) == slot(6)
    after = loads(*HOUR, "partner")
    assert [after[slot(m)] for m in range(6)] == [0] * 6  # the old slots let them go
    assert {s["start"]: s["load"] for s in expected}.items() <= after.items()
    assert sum(after.values()) == 30
    task = db.session.get(IdTask, partner)
    assert (task.first_slot, task.last_slot) == (slot(6), slot(14))
    runs = [run_slot("partner", slot(m)) for m in range(15)]
    assert not any(run.paused for run in runs)
    assert times_processed() == dict.fromkeys(range(1, 31), 1)


def test_ids_of_slots_still_open_keep_them(partner):
    pausing.pause("partner")
    before = slots_by_id(partner)
    pausing.resume("partner", now=RESUMED)
    after = slots_by_id(partner)
    assert {i: after[i] for i in range(19, 31)} == {i: before[i] for i in range(19, 31)}


def test_a_resume_and_a_planner_at_once_share_the_window_without_a_peak(rpm3, partner):
    pausing.pause("partner")
    other = submit(range(101, 121), limit="partner")
    barrier = threading.Barrier(2)
    failures = []

    def at_once(work) -> None:
        with rpm3.app_context():
            barrier.wait(10)
            try:
                work()
            except Exception as exc:  # noqa: BLE001 - reported by the test below
                failures.append(exc)

    threads = [
        threading.Thread(target=at_once, args=(work,))
        for work in (
            lambda: pausing.resume("partner", now=RESUMED),
            lambda: plan_stored_task(other, now=RESUMED),
        )
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert failures == []
    db.session.remove()
    # 12 IDs stayed in 09:06 to 09:09; 18 moved and 20 new joined them: 50 over 9 slots,
    # whichever went first, and every load is what its slot holds.
    after = loads(*HOUR, "partner")
    held = Counter([*slots_by_id(partner).values(), *slots_by_id(other).values()])
    assert {s: n for s, n in after.items() if n} == held
    assert sorted(held[slot(m)] for m in range(6, 15)) == [5] * 4 + [6] * 5


def test_a_resume_that_dies_half_way_leaves_the_limit_paused_for_a_second_one(partner, monkeypatch):
    second = submit(range(201, 204), limit="partner")
    plan_stored_task(second, now=PAST)  # into 09:10, after the first task's
    later = RESUMED + timedelta(minutes=5)  # 09:00 to 09:10 have passed
    pausing.pause("partner")
    planned, planned_loads = slots_by_id(partner), loads(*HOUR, "partner")
    replan = pausing.replan_in_place
    tasks_replanned = []

    def dies_at_the_second_task(task, *args, **kwargs):
        tasks_replanned.append(task.id)
        if len(tasks_replanned) == 2:
            raise RuntimeError("the worker died")
        return replan(task, *args, **kwargs)

    monkeypatch.setattr(pausing, "replan_in_place", dies_at_the_second_task)
    with pytest.raises(RuntimeError):
        pausing.resume("partner", now=later)
    db.session.rollback()
    assert tasks_replanned == [partner, second]
    assert db.session.get(IdTask, partner).limit.paused is True
    assert (slots_by_id(partner), loads(*HOUR, "partner")) == (planned, planned_loads)
    monkeypatch.undo()
    assert pausing.resume("partner", now=later) == 30 + 3


def test_resuming_twice_plans_nothing_twice(partner):
    pausing.pause("partner")
    assert pausing.resume("partner", now=RESUMED) == 18
    planned, planned_loads = slots_by_id(partner), loads(*HOUR, "partner")
    assert pausing.resume("partner", now=RESUMED + timedelta(minutes=3)) == 0
    assert (slots_by_id(partner), loads(*HOUR, "partner")) == (planned, planned_loads)


def test_resuming_a_limit_that_runs_changes_nothing(partner):
    planned = slots_by_id(partner)
    assert pausing.resume("partner", now=RESUMED) == 0
    assert slots_by_id(partner) == planned
    assert run_slot("partner", FIRST_SLOT).done == 3


def test_pausing_mid_slot_stops_further_claims(make_app):
    app = make_app(RPM=3)  # paced: a claim takes about a second's worth, here one ID
    with app.app_context():
        add_limit("partner", 10, "tests.processors:record_then_pause")
        task_id = submit(range(1, 11), limit="partner")
        plan_stored_task(task_id, now=PAST)
        run = run_slot("partner", FIRST_SLOT)
        assert (run.claimed, run.done, run.paused) == (1, 1, True)
        assert times_processed() == {1: 1}
        statuses = Counter(row.status for row in assignment_rows(task_id))
        assert statuses == {"done": 1, "pending": 9}


def test_reconcile_skips_a_paused_limit_and_schedules_it_once_resumed(partner):
    pausing.pause("partner")
    get_redis().flushdb()
    assert reconcile()["slot jobs added"] == 0
    pausing.resume("partner")  # now: every one of its slots has passed
    new_slots = set(slots_by_id(partner).values())
    assert min(new_slots) > datetime.now(UTC)
    get_redis().flushdb()  # what the resume scheduled is lost
    assert reconcile()["slot jobs added"] == len(new_slots)


def test_a_limit_is_paused_and_resumed_over_the_api(rpm3, partner):
    client = rpm3.test_client()
    paused = client.patch("/limits/partner/", json={"paused": True})
    assert (paused.status_code, paused.json["paused"]) == (200, True)
    assert client.get("/slots/?limit=partner").json["paused"] is True
    assert run_slot("partner", FIRST_SLOT).paused
    resumed = client.patch("/limits/partner/", json={"paused": False, "rpm": 4})
    assert (resumed.status_code, resumed.json["paused"], resumed.json["pending"]) == (
        200,
        False,
        30,
    )
    # Every slot had passed: all 30 IDs are planned again from now, at the new RPM.
    planned = Counter(slots_by_id(partner).values())
    assert min(planned) > datetime.now(UTC)
    assert max(planned.values()) == 4


PARTNER = {
    "rpm": 3,
    "processor": "workers.processors:record_user",
    "options": {},
    "adaptive": True,
    "max_refusals": 30,
}


def test_a_limit_put_names_every_field_and_a_missing_one_resets_nothing(rpm3, partner):
    client = rpm3.test_client()
    client.patch("/limits/partner/", json={"paused": True})
    for missing in ("rpm", "processor", "options", "paused", "adaptive", "max_refusals"):
        fields = {**PARTNER, "paused": False}
        del fields[missing]
        refused = client.put("/limits/partner/", json=fields)
        assert (refused.status_code, list(refused.json["errors"])) == (422, [missing])
    assert client.get("/limits/partner/").json["paused"] is True  # nothing was reset
    replaced = client.put("/limits/partner/", json={**PARTNER, "paused": False})
    assert (replaced.status_code, replaced.json["paused"]) == (200, False)


@pytest.mark.parametrize("value", ["yes", "true", 1, 0, None, [], {}])
def test_paused_is_true_or_false_and_nothing_else(rpm3, partner, value):
    client = rpm3.test_client()
    before = slots_by_id(partner)
    answer = client.patch("/limits/partner/", json={"paused": value})
    assert (answer.status_code, list(answer.json["errors"])) == (422, ["paused"])
    assert client.get("/limits/partner/").json["paused"] is False
    assert slots_by_id(partner) == before


def test_a_change_of_a_limit_says_by_name_what_it_changed_and_replanned(partner):
    pausing.pause("partner")
    paused = pausing.change_limit("partner", {"rpm": 4})
    assert (paused.limit.name, paused.limit.rpm, paused.limit.paused) == ("partner", 4, True)
    assert paused.replanned == 0

    resumed = pausing.change_limit("partner", {"paused": False}, now=RESUMED)
    assert (resumed.limit.paused, resumed.replanned) == (False, 18)
