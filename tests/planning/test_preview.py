"""Plan previews: the plan a submission would get, by the same rules, storing nothing."""

from collections import Counter
from datetime import timedelta

import pytest
from sqlalchemy import text

from service.core import locks
from service.core.extensions import db, get_redis
from service.limits import store as limits
from service.planning.planner import EPOCH
from service.planning.preview import preview_plan
from service.planning.windows import plan_stored_task

from ..helpers import at, limit_id, loads, minute, set_load, slots_by_id, submit

PREVIEW = "/celery_ids_tasks/preview"
NOW = at("2030-01-07 10:05:20")
WINDOW = at("2030-01-07 10:00")


def stored(app) -> dict:
    with app.app_context():
        limits.find(limits.DEFAULT)  # recorded once for all, as the first process would
        counts = {
            table: db.session.execute(text(f"SELECT count(*) FROM {table}")).scalar()
            for table in db.metadata.tables
        }
        counts["loads"] = db.session.execute(text("SELECT sum(load) FROM slots")).scalar()
        counts["redis keys"] = get_redis().dbsize()
    return counts


@pytest.mark.parametrize(
    ("overflow", "not_before"),
    [("spread", None), ("defer", None), ("spread", at("2030-01-07 10:21:30"))],
)
def test_a_preview_is_the_plan_an_immediate_submit_gets(rpm5, overflow, not_before):
    set_load(minute(6), 5)
    set_load(minute(7), 3)
    ids = [*range(1, 120), 7, 8, 9]
    preview = preview_plan(ids, overflow, not_before, now=NOW)
    before = loads(WINDOW, minute(60))
    task_id = submit(ids, overflow, not_before=not_before)
    plan_stored_task(task_id, now=NOW)
    added = Counter(slots_by_id(task_id).values())
    after = loads(WINDOW, minute(60))
    assert [(s["start"], s["added"], s["load"]) for s in preview["slots"]] == [
        (slot, added[slot], after[slot]) for slot in sorted(added)
    ]
    assert before == {minute(6): 5, minute(7): 3}  # the preview stored nothing
    assert (preview["total"], preview["duplicates"]) == (119, 3)
    assert (preview["first_slot"], preview["last_slot"]) == (min(added), max(added))
    assert preview["slots_above_rpm"] == sum(1 for slot in added if after[slot] > 5)


def test_a_preview_across_a_window_boundary(rpm5):
    preview = preview_plan(range(1, 1001), now=at("2030-01-07 10:13:30"))
    slots = preview["slots"]
    # Only 10:14 is open in this window: filled, then the rest spread over the next one.
    assert (slots[0]["start"], slots[0]["added"], slots[0]["load"]) == (minute(14), 5, 5)
    assert [slot["start"] for slot in slots[1:]] == [minute(m) for m in range(15, 30)]
    assert [slot["added"] for slot in slots[1:]] == [67] * 5 + [66] * 10
    assert {slot["capacity"] for slot in slots} == {5}
    assert (preview["first_slot"], preview["last_slot"]) == (minute(14), minute(29))
    assert preview["slots_above_rpm"] == 15


def test_a_preview_waits_for_no_planner(rpm5):
    # Another transaction holds the window's lock and its slots' rows, as a planner does.
    set_load(minute(8), 2)
    window = (WINDOW - EPOCH) // timedelta(minutes=15)
    with db.engine.connect() as planner:
        planner.execute(
            text("SELECT pg_advisory_xact_lock(:key)"),
            {"key": locks.window_key(limit_id(), window)},
        )
        planner.execute(text("SELECT 1 FROM slots FOR UPDATE"))
        db.session.execute(text("SET lock_timeout = '5s'"))
        preview = preview_plan([1, 2, 3, 4], now=NOW)
        planner.rollback()
    assert [(s["start"], s["load"]) for s in preview["slots"]] == [(minute(6), 4)]


def test_the_api_answers_a_json_preview_and_stores_nothing(app, client):
    before = stored(app)
    answer = client.post(PREVIEW, json={"task_name": "t", "ids": [1, 2, 2], "overflow": "defer"})
    assert answer.status_code == 200
    body = answer.json
    assert (body["total"], body["duplicates"], body["overflow"]) == (2, 1, "defer")
    assert [(s["added"], s["load"]) for s in body["slots"]] == [(2, 2)]
    assert body["first_slot"] == body["last_slot"] == body["slots"][0]["start"]
    assert stored(app) == before


def test_the_api_previews_a_text_body_from_a_start(app, client):
    answer = client.post(
        f"{PREVIEW}?not_before=2026-01-01T00:00:00Z", data="5\n6,7", content_type="text/csv"
    )
    assert answer.status_code == 200
    assert answer.json["not_before"] == "2026-01-01T00:00:00+00:00"
    assert sum(slot["added"] for slot in answer.json["slots"]) == 3


@pytest.mark.parametrize(
    "request_",
    [
        {"json": {"task_name": "t", "ids": [0]}},
        {"json": {"task_name": "t", "ids": [1], "not_before": "2026-01-01T00:00:00"}},
        {"data": "1 two", "content_type": "text/plain"},
        {"data": " , ", "content_type": "text/csv"},
    ],
)
def test_a_bad_preview_is_a_422_and_stores_nothing(app, client, request_):
    before = stored(app)
    answer = client.post(PREVIEW, **request_)
    assert (answer.status_code, answer.json["code"]) == (422, 422)
    assert stored(app) == before
