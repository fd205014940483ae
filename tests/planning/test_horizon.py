"""The plan's horizon (MAX_PLAN_DAYS): a task, a change of its IDs or start, or a preview
whose last ID would land past it is refused with 422, storing nothing; a task that other
tasks pushed past it meanwhile is refused by its planning job; retries are not refused."""

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from service.core.extensions import db
from service.core.models import IdTask
from service.jobs import PLANNING_QUEUE, get_queue, get_scheduler
from service.planning.planner import SlotGrid, overreach
from service.planning.retries import plan_retries
from service.planning.windows import plan_stored_task

from ..helpers import at, snapshot

TASKS = "/celery_ids_tasks/"
PREVIEW = f"{TASKS}preview"
MINUTE = timedelta(minutes=1)
# A day of one-minute slots at RPM 1: with no lead to speak of, the slots from the next
# minute to the one holding now + 1 day, 1,440 of them, whatever the second it is.
SLOTS_BY_THE_HORIZON = 1440


@pytest.fixture
def day_app(make_app):
    """A horizon of one day at RPM 1, with a lead too short to move the first open slot."""
    return make_app(RPM=1, MAX_PLAN_DAYS=1, PLAN_LEAD_SECONDS=0, PLANNING_RATE=10_000_000)


@pytest.fixture
def client(day_app):
    return day_app.test_client()


def ids_text(count: int) -> str:
    return "\n".join(str(number) for number in range(1, count + 1))


def past_the_horizon(answer, total: int, field: str = "ids") -> dict:
    """The figures of a refusal, checked against each other: the IDs that do not fit by
    the horizon fill the slots after it, one a minute."""
    assert answer.status_code == 422, answer.json
    figures = answer.json["errors"][field]
    horizon = datetime.fromisoformat(figures["horizon"])
    assert horizon - datetime.now(UTC) < timedelta(days=1)
    assert (figures["max_plan_days"], figures["total"]) == (1, total)
    message = answer.json["message"]
    assert "the horizon of 1 day ahead (MAX_PLAN_DAYS)" in message
    assert f"{figures['fit']} of its {total} IDs fit by the horizon" in message
    assert f"its last ID would need the slot of {figures['last_slot']}" in message
    return figures


def without_horizon(answer) -> dict:
    """A refusal's figures but the horizon, which moves on with the clock."""
    figures = answer.json["errors"]["not_before"]
    return {name: value for name, value in figures.items() if name != "horizon"}


def the_horizons_last_slot(figures: dict) -> datetime:
    horizon = datetime.fromisoformat(figures["horizon"])
    return horizon.replace(second=0, microsecond=0)


def test_a_deferring_task_past_the_horizon_is_refused_storing_nothing(day_app, client):
    before = snapshot(day_app)
    body = {"task_name": "t", "ids": list(range(1, 2001)), "overflow": "defer"}
    figures = past_the_horizon(client.post(TASKS, json=body), 2000)
    assert figures["fit"] == SLOTS_BY_THE_HORIZON
    last = the_horizons_last_slot(figures) + (2000 - SLOTS_BY_THE_HORIZON) * MINUTE
    assert datetime.fromisoformat(figures["last_slot"]) == last
    assert snapshot(day_app) == before  # no task row, no IDs, nothing queued
    assert client.get(TASKS).json == []


def test_a_text_body_past_the_horizon_is_rolled_back_after_its_copy(day_app, client):
    before = snapshot(day_app)
    answer = client.post(
        f"{TASKS}?task_name=big&overflow=defer", data=ids_text(1500), content_type="text/csv"
    )
    figures = past_the_horizon(answer, 1500)
    assert figures["fit"] == SLOTS_BY_THE_HORIZON
    assert snapshot(day_app) == before  # the IDs it streamed in went with the transaction
    with day_app.app_context():
        assert db.session.execute(text("SELECT count(*) FROM task_id_chunks")).scalar() == 0


def test_a_preview_past_the_horizon_is_refused_too(day_app, client):
    before = snapshot(day_app)
    answer = client.post(f"{PREVIEW}?overflow=defer", data=ids_text(1441), content_type="text/csv")
    figures = past_the_horizon(answer, 1441)
    assert figures["fit"] == SLOTS_BY_THE_HORIZON
    assert datetime.fromisoformat(figures["last_slot"]) == the_horizons_last_slot(figures) + MINUTE
    assert snapshot(day_app) == before


@pytest.mark.parametrize("overflow", ["spread", "defer"])
def test_a_start_past_the_horizon_is_refused_whatever_the_overflow(day_app, client, overflow):
    before = snapshot(day_app)
    start = (datetime.now(UTC) + timedelta(days=2)).replace(second=0, microsecond=0)
    body = {
        "task_name": "t",
        "ids": [1, 2, 3],
        "overflow": overflow,
        "not_before": start.isoformat(),
    }
    answer = client.post(TASKS, json=body)
    figures = past_the_horizon(answer, 3, field="not_before")
    assert figures["fit"] == 0
    assert datetime.fromisoformat(figures["last_slot"]) == start + 2 * MINUTE
    assert f"not_before {start.isoformat()} is past the horizon" in answer.json["message"]
    in_query = client.post(
        TASKS,
        query_string={"not_before": start.isoformat(), "overflow": overflow},
        data="1 2 3",
        content_type="text/csv",
    )
    assert without_horizon(in_query) == without_horizon(answer)
    preview = client.post(PREVIEW, json=body)
    assert without_horizon(preview) == without_horizon(answer)
    assert snapshot(day_app) == before


def test_tasks_submit_refuses_a_file_past_the_horizon(day_app, tmp_path):
    before = snapshot(day_app)
    source = tmp_path / "ids.csv"
    source.write_text(ids_text(1500))
    args = ["tasks", "submit", str(source), "--name", "big", "--overflow", "defer"]
    result = day_app.test_cli_runner().invoke(args=args)
    assert result.exit_code == 1, result.output
    assert "the plan would go past the horizon of 1 day ahead" in result.output
    assert f"{SLOTS_BY_THE_HORIZON} of its 1500 IDs fit by the horizon" in result.output
    assert snapshot(day_app) == before


def test_a_task_just_inside_the_horizon_is_accepted_and_planned_by_it(day_app, client):
    body = {"task_name": "t", "ids": list(range(1, SLOTS_BY_THE_HORIZON + 1)), "overflow": "defer"}
    answer = client.post(TASKS, json=body)
    assert answer.status_code == 202, answer.json
    with day_app.app_context():
        outcome = plan_stored_task(answer.json["id"])
        assert outcome.planned == SLOTS_BY_THE_HORIZON
        assert outcome.last_slot <= datetime.now(UTC) + timedelta(days=1)


def test_a_big_spread_task_stays_in_its_window_so_the_horizon_never_refuses_it(client):
    answer = client.post(TASKS, json={"task_name": "t", "ids": list(range(1, 5001))})
    assert answer.status_code == 202, answer.json


def test_new_ids_or_a_new_start_past_the_horizon_leave_the_task_as_it_was(day_app, client):
    accepted = client.post(TASKS, json={"task_name": "t", "ids": [1, 2, 3], "overflow": "defer"})
    task_id = accepted.json["id"]
    with day_app.app_context():
        plan_stored_task(task_id)
    before = snapshot(day_app)
    shown = client.get(f"{TASKS}{task_id}/").json
    replaced = client.put(
        f"{TASKS}{task_id}/",
        json={"task_name": "t", "ids": list(range(1, 1501)), "overflow": "defer"},
    )
    # The places its own three IDs hold count as free: new IDs replace them.
    figures = past_the_horizon(replaced, 1500)
    assert figures["fit"] == SLOTS_BY_THE_HORIZON
    start = (datetime.now(UTC) + timedelta(days=3)).isoformat()
    moved = client.patch(f"{TASKS}{task_id}/", json={"not_before": start})
    past_the_horizon(moved, 3, field="not_before")
    assert snapshot(day_app) == before  # its IDs, plan, jobs and status as they were
    after = client.get(f"{TASKS}{task_id}/").json
    assert after == shown
    assert (after["status"], after["total"], after["planned"]) == ("scheduled", 3, 3)


def test_a_task_pushed_past_the_horizon_before_its_planning_is_refused_by_it(day_app, client):
    body = {"task_name": "first", "ids": list(range(1, SLOTS_BY_THE_HORIZON + 1))}
    first = client.post(TASKS, json={**body, "overflow": "defer"}).json["id"]
    # Another task is planned first and takes ten of the places the first one counted on.
    second = client.post(
        TASKS, json={"task_name": "second", "ids": list(range(1, 11)), "overflow": "defer"}
    ).json["id"]
    with day_app.app_context():
        assert plan_stored_task(second).planned == 10
        jobs_before = get_scheduler().count()
        outcome = plan_stored_task(first)
        assert outcome.planned == 0
        assert get_scheduler().count() == jobs_before  # no slot job for the refused task
        rows = db.session.execute(
            text("SELECT count(*) FROM assignments WHERE task_id = :t"), {"t": first}
        ).scalar()
        load = db.session.execute(text("SELECT sum(load) FROM slots")).scalar()
    assert (rows, load) == (0, 10)  # nothing of its plan stayed
    refused = client.get(f"{TASKS}{first}/").json
    assert (refused["status"], refused["task_status"], refused["pending"]) == ("refused", True, 0)
    assert refused["error"].startswith("not planned: the plan would go past the horizon of 1 day")
    assert f"{SLOTS_BY_THE_HORIZON - 10} of its {SLOTS_BY_THE_HORIZON} IDs fit" in refused["error"]
    assert (refused["planned"], refused["first_slot"], refused["last_slot"]) == (0, None, None)
    page = client.get(f"/plan/tasks/{first}").get_data(as_text=True)
    assert "refused: none of its IDs was planned" in page
    assert "not planned: the plan would go past the horizon" in page
    # Its IDs stay readable; new IDs that fit plan it after all.
    assert client.get(f"{TASKS}{first}/ids/").json[0]["status"] == "received"
    changed = client.put(
        f"{TASKS}{first}/",
        json={"task_name": "first", "ids": list(range(1, 1431)), "overflow": "defer"},
    )
    assert (changed.status_code, changed.json["status"], changed.json["error"]) == (
        200,
        "received",
        None,
    )
    with day_app.app_context():
        assert get_queue(PLANNING_QUEUE).job_ids[-1] == f"plan-{first}"
        assert plan_stored_task(first).planned == 1430


def test_a_refused_task_may_be_cancelled(day_app, client):
    task_id = client.post(TASKS, json={"task_name": "t", "ids": [1]}).json["id"]
    with day_app.app_context():
        task = db.session.get(IdTask, task_id)
        task.status, task.error = "refused", "not planned: ..."
        db.session.commit()
    assert client.delete(f"{TASKS}{task_id}/").status_code == 204
    cancelled = client.get(f"{TASKS}{task_id}/").json
    assert (cancelled["status"], cancelled["error"]) == ("cancelled", None)


def test_a_refused_task_whose_limit_was_deleted_must_name_another(day_app, client):
    assert client.post("/limits/", json={"name": "gone", "rpm": 1}).status_code == 201
    body = {"task_name": "t", "ids": [1], "limit": "gone"}
    task_id, other = (client.post(TASKS, json=body).json["id"] for _ in range(2))
    with day_app.app_context():
        db.session.execute(text("UPDATE id_tasks SET status = 'refused'"))
        db.session.commit()
    assert client.delete("/limits/gone/").status_code == 204  # a refused task waits for nothing
    answer = client.patch(f"{TASKS}{task_id}/", json={"ids": [2]})
    assert (answer.status_code, list(answer.json["errors"])) == (422, ["limit"])
    moved = client.patch(f"{TASKS}{task_id}/", json={"ids": [2], "limit": "default"})
    assert (moved.status_code, moved.json["status"]) == (200, "received")
    assert client.delete(f"{TASKS}{other}/").status_code == 204


def test_a_retry_of_an_id_promised_already_is_planned_past_the_horizon(day_app, client):
    body = {"task_name": "t", "ids": list(range(1, SLOTS_BY_THE_HORIZON + 1)), "overflow": "defer"}
    task_id = client.post(TASKS, json=body).json["id"]
    with day_app.app_context():
        planned = plan_stored_task(task_id)
        horizon = datetime.now(UTC) + timedelta(days=1)
        # Its first ID failed and waits for its retry: every place by the horizon is taken.
        db.session.execute(
            text(
                "UPDATE assignments SET status = 'retrying', retry_at = now() "
                "WHERE task_id = :t AND position = 0"
            ),
            {"t": task_id},
        )
        db.session.commit()
        assert plan_retries() == 1
        retried = db.session.execute(
            text("SELECT slot_start, status FROM assignments WHERE task_id = :t AND position = 0"),
            {"t": task_id},
        ).one()
    assert tuple(retried) == (planned.last_slot + MINUTE, "pending")
    assert retried.slot_start > horizon - MINUTE


# The arithmetic itself, on a grid of one-minute slots and a one-day horizon.
GRID = SlotGrid(slot_seconds=60, window_slots=15, lead_seconds=2.0, horizon_seconds=86400)
NOW = at("2030-01-07 10:00:30")


def test_the_places_by_the_horizon_are_its_open_slots_less_those_taken():
    # 10:01 to 10:00 the next day: 1,440 slots, 2,880 places at RPM 2; 80 taken.
    assert overreach(GRID, NOW, None, 2800, 2, placed=80) is None
    too_many = overreach(GRID, NOW, None, 2805, 2, placed=80)
    assert (too_many.fit, too_many.last_slot) == (2800, at("2030-01-08 10:03"))


def test_a_start_past_the_horizon_leaves_no_place_and_counts_from_the_start():
    late = overreach(GRID, NOW, at("2030-01-09 12:00:10"), 5, 2, placed=0)
    assert (late.fit, late.last_slot) == (0, at("2030-01-09 12:03"))


def test_the_lead_and_a_start_inside_the_horizon_shorten_the_span():
    # The lead keeps 10:01 closed at 10:00:58; a start at 22:00 leaves 12 h 1 min of slots.
    assert GRID.first_open_slot(at("2030-01-07 10:00:58")) == at("2030-01-07 10:02")
    assert GRID.places_by_horizon(NOW, at("2030-01-07 22:00"), 1) == 12 * 60 + 1
    assert GRID.spread_window(NOW, at("2030-01-08 10:00:20"), 8) is None
    assert GRID.spread_window(NOW, None, 8) == at("2030-01-07 10:00")
