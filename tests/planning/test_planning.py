"""Planning stored tasks into slots, on real PostgreSQL."""

import json
import time
from datetime import UTC, datetime

import pytest
from rq import Queue
from sqlalchemy import text

from service.core.extensions import db, get_redis
from service.core.models import IdTask
from service.jobs import PLANNING_QUEUE
from service.planning.windows import plan_stored_task
from service.tasks.store import IDS_PER_CHUNK

from ..helpers import at, loads, minute, set_load, slots_by_id, submit

NOW = at("2030-01-07 10:07:20")
WINDOW = at("2030-01-07 10:00")
NEXT_WINDOW = at("2030-01-07 10:15")


def plan_two_tasks(now, b_overflow=None) -> tuple[dict, dict]:
    """DESIGN's live-window example: task A (1-20), then task B (101-120)."""
    task_a = submit(range(1, 21))
    plan_stored_task(task_a, now=now)
    task_b = submit(range(101, 121), overflow=b_overflow)
    plan_stored_task(task_b, now=now)
    return slots_by_id(task_a), slots_by_id(task_b)


def test_live_window_example_of_the_design(rpm5):
    # 10:05:20: nine open slots, at least eight, so the overflow is spread here.
    set_load(minute(6), 5)
    set_load(minute(7), 3)
    planned_a, planned_b = plan_two_tasks(at("2030-01-07 10:05:20"))
    assert [planned_a[i] for i in (1, 2)] == [minute(7)] * 2
    assert [planned_a[i] for i in range(3, 8)] == [minute(8)] * 5
    assert [planned_a[i] for i in range(18, 21)] == [minute(11)] * 3
    assert [planned_b[i] for i in (101, 102)] == [minute(11)] * 2
    assert [planned_b[i] for i in range(113, 118)] == [minute(14)] * 5
    assert [planned_b[i] for i in (118, 119, 120)] == [minute(6), minute(7), minute(8)]
    assert list(loads(WINDOW, NEXT_WINDOW).values()) == [6, 6, 6, 5, 5, 5, 5, 5, 5]


def test_live_window_example_with_defer(rpm5):
    set_load(minute(6), 5)
    set_load(minute(7), 3)
    _, planned_b = plan_two_tasks(at("2030-01-07 10:05:20"), b_overflow="defer")
    assert [planned_b[i] for i in range(113, 118)] == [minute(14)] * 5
    assert [planned_b[i] for i in (118, 119, 120)] == [minute(15)] * 3
    assert max(loads(WINDOW, at("2030-01-07 11:00")).values()) == 5


@pytest.mark.parametrize("b_overflow", ["spread", "defer"])
def test_with_seven_open_slots_the_overflow_goes_to_the_next_window(rpm5, b_overflow):
    set_load(minute(8), 5)
    set_load(minute(9), 3)
    planned_a, planned_b = plan_two_tasks(NOW, b_overflow)
    assert [planned_a[i] for i in (1, 2)] == [minute(9)] * 2
    assert [planned_a[i] for i in range(18, 21)] == [minute(13)] * 3
    assert [planned_b[i] for i in (101, 102)] == [minute(13)] * 2
    assert [planned_b[i] for i in range(103, 108)] == [minute(14)] * 5
    assert [planned_b[i] for i in range(108, 113)] == [minute(15)] * 5
    assert [planned_b[i] for i in range(113, 118)] == [minute(16)] * 5
    assert [planned_b[i] for i in (118, 119, 120)] == [minute(17)] * 3
    assert max(loads(WINDOW, at("2030-01-07 11:00")).values()) == 5


def test_late_in_a_window_a_big_task_is_spread_over_the_next_one(make_app):
    with make_app(RPM=120).app_context():
        task_id = submit(range(1, 20_001))
        plan_stored_task(task_id, now=at("2030-01-07 10:13:30"))
        planned = loads(WINDOW, at("2030-01-07 10:30"))
    assert planned[minute(14)] == 120
    assert [planned[minute(m)] for m in range(15, 20)] == [1326] * 5
    assert [planned[minute(m)] for m in range(20, 30)] == [1325] * 10


def test_in_the_middle_of_a_window_a_big_task_is_spread_there(make_app):
    with make_app(RPM=120).app_context():
        task_id = submit(range(1, 20_001))
        plan_stored_task(task_id, now=at("2030-01-07 10:06:30"))
        planned = loads(WINDOW, at("2030-01-07 10:30"))
    assert list(planned) == [minute(m) for m in range(7, 15)]
    assert set(planned.values()) == {2500}


def test_a_closed_window_sends_ids_to_the_next(rpm5):
    task = submit([1, 2])
    plan_stored_task(task, now=at("2030-01-07 10:14:30"))
    assert set(slots_by_id(task).values()) == {NEXT_WINDOW}


def test_planning_marks_the_task_scheduled_with_its_span(rpm5):
    task_id = submit(range(1, 13))
    outcome = plan_stored_task(task_id, now=NOW)
    assert (outcome.planned, outcome.first_slot, outcome.skipped) == (12, minute(8), None)
    task = db.session.get(IdTask, task_id)
    assert (task.status, task.planned, task.pending) == ("scheduled", 12, 12)
    assert (task.first_slot, task.last_slot) == (minute(8), minute(10))


def test_planning_twice_plans_once(rpm5):
    task_id = submit(range(1, 13))
    plan_stored_task(task_id, now=NOW)
    assert plan_stored_task(task_id, now=NOW).skipped == "already scheduled"
    assert len(slots_by_id(task_id)) == 12
    assert sum(loads(WINDOW, NEXT_WINDOW).values()) == 12


def test_a_task_across_several_chunks_keeps_submission_order(rpm5):
    count = IDS_PER_CHUNK * 2 + 7
    task_id = submit(range(1, count + 1))
    plan_stored_task(task_id, now=NOW)
    rows = db.session.execute(
        text("SELECT position, user_id FROM assignments WHERE task_id = :t ORDER BY position"),
        {"t": task_id},
    ).all()
    assert [row.user_id for row in rows] == list(range(1, count + 1))
    assert [row.position for row in rows] == list(range(count))
    # Seven open slots: they are filled, and the rest is spread over the next window.
    assert set(loads(WINDOW, NEXT_WINDOW).values()) == {5}
    next_loads = list(loads(NEXT_WINDOW, at("2030-01-07 10:30")).values())
    assert len(next_loads) == 15 and max(next_loads) - min(next_loads) <= 1


def test_cancel_frees_the_capacity_of_pending_ids(rpm5):
    task_id = submit(range(1, 9))
    plan_stored_task(task_id, now=NOW)
    client = rpm5.test_client()
    assert client.delete(f"/celery_ids_tasks/{task_id}/").status_code == 204
    assert set(loads(WINDOW, NEXT_WINDOW).values()) == {0}
    ids = client.get(f"/celery_ids_tasks/{task_id}/ids/").json
    assert {item["status"] for item in ids} == {"cancelled"}
    assert all(item["slot"] for item in ids)


def test_new_ids_release_the_old_plan_and_replan(rpm5):
    task_id = submit(range(1, 9))
    plan_stored_task(task_id, now=NOW)
    answer = rpm5.test_client().patch(f"/celery_ids_tasks/{task_id}/", json={"ids": [50, 51]})
    assert answer.status_code == 200
    assert (answer.json["status"], answer.json["planned"]) == ("received", 0)
    assert sum(loads(WINDOW, NEXT_WINDOW).values()) == 0
    plan_stored_task(task_id, now=NOW)
    assert slots_by_id(task_id) == {50: minute(8), 51: minute(8)}


def test_ids_cannot_change_once_the_task_runs(rpm5):
    task_id = submit([1, 2])
    plan_stored_task(task_id, now=NOW)
    db.session.execute(text("UPDATE id_tasks SET status = 'running' WHERE id = :t"), {"t": task_id})
    db.session.commit()
    client = rpm5.test_client()
    answer = client.put(f"/celery_ids_tasks/{task_id}/", json={"task_name": "x", "ids": [3]})
    assert answer.status_code == 409
    assert client.patch(f"/celery_ids_tasks/{task_id}/", json={"task_name": "y"}).status_code == 200
    assert slots_by_id(task_id) == {1: minute(8), 2: minute(8)}


def test_ids_list_filters_by_status_and_slot(rpm5):
    task_id = submit(range(1, 13))
    plan_stored_task(task_id, now=NOW)
    client = rpm5.test_client()
    by_slot = client.get(f"/celery_ids_tasks/{task_id}/ids/?slot=2030-01-07T10:09:00Z")
    assert [item["id"] for item in by_slot.json] == [6, 7, 8, 9, 10]
    assert json.loads(by_slot.headers["X-Pagination"])["total"] == 5
    assert client.get(f"/celery_ids_tasks/{task_id}/ids/?status=failed").json == []
    pending = client.get(f"/celery_ids_tasks/{task_id}/ids/?status=pending&page_size=100").json
    assert len(pending) == 12
    assert client.get(f"/celery_ids_tasks/{task_id}/ids/?status=bogus").status_code == 422


def test_slots_shows_the_plan_grouped_by_window(rpm5):
    plan_stored_task(submit(range(1, 13)), now=NOW)
    answer = rpm5.test_client().get("/slots/?from=2030-01-07T10:00:00Z&to=2030-01-07T10:30:00Z")
    assert answer.status_code == 200
    plan = answer.json
    assert plan["rpm"] == 5
    assert [w["start"] for w in plan["windows"]] == [
        "2030-01-07T10:00:00+00:00",
        "2030-01-07T10:15:00+00:00",
    ]
    first = plan["windows"][0]
    assert (first["load"], first["capacity"], len(first["slots"])) == (12, 75, 15)
    assert [s["load"] for s in first["slots"][8:11]] == [5, 5, 2]


def test_slots_answers_any_range_it_is_asked_for(client):
    backwards = client.get("/slots/?from=2030-01-07T10:00:00Z&to=2030-01-07T09:00:00Z")
    assert (backwards.status_code, backwards.json["windows"]) == (200, [])
    # Two days hold 2,880 slots: the answer stops at 1,440, a day of them.
    long = client.get("/slots/?from=2030-01-07T00:00:00Z&to=2030-01-09T00:00:00Z")
    assert long.status_code == 200
    slots = [slot for window in long.json["windows"] for slot in window["slots"]]
    assert len(slots) == 1440
    assert slots[-1]["start"] == "2030-01-07T23:59:00+00:00"


@pytest.mark.parametrize(
    "query",
    [
        "from=yesterday",
        "from=9999-12-31T23:50:00",
        "from=0001-01-01T00:00:00%2B14:00",
    ],
)
def test_slots_refuses_a_bad_range(client, query):
    answer = client.get(f"/slots/?{query}")
    assert answer.status_code == 422
    assert answer.json["message"]


def test_defer_ending_exactly_at_a_full_window_stops_there(rpm5):
    task_id = submit(range(1, 36), overflow="defer")  # 7 open slots x RPM 5
    plan_stored_task(task_id, now=NOW)
    assert set(slots_by_id(task_id).values()) == {minute(m) for m in range(8, 15)}
    assert db.session.get(IdTask, task_id).last_slot == minute(14)


def test_a_big_task_planned_just_before_a_slot_starts_puts_nothing_in_it(make_app):
    app = make_app(
        RPM=100_000, SLOT_SECONDS=2, WINDOW_SLOTS=30, PLAN_LEAD_SECONDS=0.5, PLANNING_RATE=50_000
    )
    with app.app_context():
        task_id = submit(range(1, 300_001))
        # 0.8 s before a slot starts: open by PLAN_LEAD_SECONDS alone, but 300,000 IDs take
        # longer than that to write.
        now = time.time()
        slot_start = (now // 2 + 1) * 2
        if slot_start - now < 0.8:
            slot_start += 2
        time.sleep(slot_start - 0.8 - now)
        plan_stored_task(task_id)
        committed = datetime.now(UTC)
        first_slot = db.session.get(IdTask, task_id).first_slot
    assert first_slot > committed
    assert first_slot >= datetime.fromtimestamp(slot_start + 2 * 3, UTC)  # 6 s of writing


def test_planning_jobs_get_a_timeout_that_grows_with_the_task(make_app):
    with make_app(PLANNING_RATE=1000).app_context():
        small, big = submit([1]), submit(range(1, 5001))
        queue = Queue(PLANNING_QUEUE, connection=get_redis())
        timeouts = [queue.fetch_job(f"plan-{task_id}").timeout for task_id in (small, big)]
    assert timeouts == [181, 230]


def test_a_put_with_the_task_s_own_ids_keeps_its_plan(rpm5):
    task_id = submit([1, 2, 3])
    plan_stored_task(task_id, now=NOW)
    client = rpm5.test_client()
    answer = client.put(
        f"/celery_ids_tasks/{task_id}/", json={"task_name": "new", "ids": [1, 2, 3]}
    )
    assert answer.status_code == 200
    assert (answer.json["task_name"], answer.json["status"]) == ("new", "scheduled")
    assert answer.json["planned"] == 3
    assert Queue(PLANNING_QUEUE, connection=get_redis()).job_ids == [f"plan-{task_id}"]


def test_a_put_with_the_task_s_own_ids_after_some_ran_is_a_rename(rpm5):
    task_id = submit([1, 2, 3])
    plan_stored_task(task_id, now=NOW)
    db.session.execute(text("UPDATE id_tasks SET status = 'running' WHERE id = :t"), {"t": task_id})
    db.session.execute(text("UPDATE assignments SET status = 'done' WHERE position = 0"))
    db.session.commit()
    answer = rpm5.test_client().put(
        f"/celery_ids_tasks/{task_id}/", json={"task_name": "renamed", "payload": "1,2,3,3"}
    )
    assert answer.status_code == 200
    assert (answer.json["task_name"], answer.json["status"]) == ("renamed", "running")
    assert answer.json["duplicates"] == 1
    assert slots_by_id(task_id) == {1: minute(8), 2: minute(8), 3: minute(8)}


def test_a_put_without_overflow_sets_the_default(rpm5):
    task_id = submit([1, 2, 3], overflow="defer")
    plan_stored_task(task_id, now=NOW)
    answer = rpm5.test_client().put(
        f"/celery_ids_tasks/{task_id}/", json={"task_name": "t", "ids": [1, 2, 3]}
    )
    assert (answer.status_code, answer.json["overflow"]) == (200, "spread")
    assert answer.json["status"] == "received"  # a new overflow is planned again
