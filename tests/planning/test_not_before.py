"""A task's start (`not_before`): accepted, stored, shown, planned from and changed."""

from datetime import UTC, datetime, timedelta

import pytest

from service.core.extensions import db
from service.core.models import IdTask
from service.planning.windows import plan_stored_task

from ..helpers import at, just_before_a_window, minute, slots_by_id, submit

NOW = at("2030-01-07 10:07:20")
TASKS = "/celery_ids_tasks/"


def test_planning_starts_at_the_window_holding_a_later_start(rpm5):
    task_id = submit(range(1, 21), not_before=at("2030-01-07 10:37:30"))
    outcome = plan_stored_task(task_id, now=NOW)
    planned = slots_by_id(task_id)
    # 10:38-10:44 are seven slots, fewer than eight: filled, then the next window.
    assert [planned[i] for i in (1, 5, 6, 20)] == [minute(38), minute(38), minute(39), minute(41)]
    assert outcome.first_slot == minute(38)


def test_the_current_window_rule_counts_only_slots_from_the_start(rpm5):
    task_id = submit(range(1, 21), not_before=at("2030-01-07 10:43:30"))
    plan_stored_task(task_id, now=NOW)
    planned = slots_by_id(task_id)
    assert min(planned.values()) == minute(44)
    assert sorted(set(planned.values())) == [minute(44), minute(45), minute(46), minute(47)]


def test_a_start_in_the_past_means_now(rpm5):
    task_id = submit(range(1, 21), not_before=at("2030-01-07 09:00"))
    plan_stored_task(task_id, now=NOW)
    assert min(slots_by_id(task_id).values()) == minute(8)


def test_the_lead_still_applies_to_a_start_just_ahead(rpm5):
    task_id = submit([1], not_before=at("2030-01-07 10:08"))
    plan_stored_task(task_id, now=at("2030-01-07 10:07:59"))
    assert slots_by_id(task_id) == {1: minute(9)}


def test_a_start_is_stored_and_shown(client):
    answer = client.post(
        TASKS, json={"task_name": "t", "ids": [1], "not_before": "2026-01-07T12:30:00+02:00"}
    )
    assert answer.status_code == 202
    assert answer.json["not_before"] == "2026-01-07T10:30:00+00:00"
    read = client.get(f"{TASKS}{answer.json['id']}/").json
    assert read["not_before"] == answer.json["not_before"]
    without = client.post(TASKS, json={"task_name": "t", "ids": [2]}).json
    assert without["not_before"] is None


def test_a_text_body_takes_its_start_in_the_query(client):
    answer = client.post(
        f"{TASKS}?not_before=2026-01-07T10:30:00Z", data="1 2", content_type="text/csv"
    )
    assert (answer.status_code, answer.json["not_before"]) == (202, "2026-01-07T10:30:00+00:00")


@pytest.mark.parametrize(
    ("not_before", "clue"),
    [
        ("2030-01-07T10:30:00", "time zone"),
        ("{far}", "at most a year ahead"),
        ("next tuesday", "Not a valid datetime"),
        ("0001-01-01T00:00:00+14:00", "years 1970 and 9000"),
    ],
)
def test_a_bad_start_is_refused(client, not_before, clue):
    far = (datetime.now(UTC) + timedelta(days=367)).isoformat()
    body = {"task_name": "t", "ids": [1], "not_before": not_before.format(far=far)}
    answer = client.post(TASKS, json=body)
    assert answer.status_code == 422
    assert clue in str(answer.json["errors"]["not_before"])
    query = client.post(
        TASKS, query_string={"not_before": body["not_before"]}, data="1", content_type="text/csv"
    )
    assert query.status_code == 422
    assert query.json["errors"] == answer.json["errors"]
    assert client.get(TASKS).json == []


def test_a_new_start_re_plans_while_the_task_may_be(rpm5):
    now = just_before_a_window(timedelta(hours=1))
    later = now + timedelta(seconds=10) + timedelta(minutes=30)
    task_id = submit([1, 2, 3])
    plan_stored_task(task_id, now=now)
    client = rpm5.test_client()
    same = client.patch(f"{TASKS}{task_id}/", json={"not_before": None})
    assert (same.status_code, same.json["status"]) == (200, "scheduled")
    moved = client.patch(f"{TASKS}{task_id}/", json={"not_before": later.isoformat()})
    assert (moved.status_code, moved.json["status"]) == (200, "received")
    plan_stored_task(task_id, now=now)
    assert set(slots_by_id(task_id).values()) == {later}
    # A PUT without a start clears it, as it sets the default overflow.
    cleared = client.put(f"{TASKS}{task_id}/", json={"task_name": "t", "ids": [1, 2, 3]})
    assert (cleared.json["not_before"], cleared.json["status"]) == (None, "received")


def test_a_started_task_keeps_its_start(rpm5):
    task_id = submit([1, 2, 3])
    plan_stored_task(task_id, now=NOW)
    db.session.get(IdTask, task_id).status = "running"
    db.session.commit()
    answer = rpm5.test_client().patch(
        f"{TASKS}{task_id}/", json={"not_before": "2026-01-07T10:30:00Z"}
    )
    assert answer.status_code == 409
    assert db.session.get(IdTask, task_id).not_before is None
