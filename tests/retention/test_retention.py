"""Days of IDs in partitions of their own: made ahead and by planning, dropped whole
once their tasks are finished and old; the tasks stay, their IDs answer 410 Gone."""

from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy import text

from service.core import partitions
from service.core.extensions import db
from service.core.models import IdTask
from service.core.outages import lock_not_granted
from service.dispatch.slot_runs import run_slot
from service.limits.store import DEFAULT
from service.planning.windows import plan_stored_task
from service.retention.services import keep_days
from service.retention.store import midnight

from ..helpers import at, submit

# Each task is submitted, planned and run on a day of its own, long ago.
DAYS = [date(2026, 1, 5), date(2026, 1, 6), date(2026, 1, 7)]
SETTINGS = {
    "PACING": False,
    "SLOT_SECONDS": 1,
    "WINDOW_SLOTS": 5,
    "PLAN_LEAD_SECONDS": 0.2,
    "RETENTION_DAYS": 30,
}


def _task_of_day(day: date, ids, run: bool = True) -> int:
    """A task created on `day` at 08:59:50, planned then, and run unless `run` is false."""
    created = midnight(day) + timedelta(hours=8, minutes=59, seconds=50)
    task_id = submit(ids)
    db.session.execute(
        text("UPDATE id_tasks SET date_created = :c WHERE id = :t"), {"c": created, "t": task_id}
    )
    db.session.commit()
    plan_stored_task(task_id, now=created)
    if run:
        for slot in _slots_of(task_id):
            run_slot(DEFAULT, slot)
    return task_id


def _slots_of(task_id: int) -> list[datetime]:
    return db.session.scalars(
        text("SELECT DISTINCT slot_start FROM assignments WHERE task_id = :t ORDER BY 1"),
        {"t": task_id},
    ).all()


def _finished_days_ago(task_id: int, days: int) -> None:
    db.session.execute(
        text("UPDATE id_tasks SET finished_at = clock_timestamp() - :d WHERE id = :t"),
        {"d": timedelta(days=days), "t": task_id},
    )
    db.session.commit()


def _add_events(finished_days_ago: list[int]) -> None:
    for days in finished_days_ago:
        db.session.execute(
            text(
                "INSERT INTO limit_events (limit_id, kind, reason, from_rpm, to_rpm, finished_at) "
                "SELECT id, 'lowered', :reason, 10, 7, clock_timestamp() - :ago FROM limits "
                "WHERE name = 'default'"
            ),
            {"reason": f"finished {days} days ago", "ago": timedelta(days=days)},
        )
    db.session.commit()


def _load_and_done(plan: dict, slot: datetime) -> tuple[int, int]:
    [shown] = [s for w in plan["windows"] for s in w["slots"] if s["start"] == slot.isoformat()]
    return shown["load"], shown["done"]


def _partitions_of(task_id: int) -> list[str]:
    return db.session.scalars(
        text("SELECT DISTINCT tableoid::regclass::text FROM assignments WHERE task_id = :t"),
        {"t": task_id},
    ).all()


@pytest.fixture(autouse=True)
def _no_past_days_left(app):
    """Days made by a test for its tasks go after it, so that the next finds none."""
    yield
    with app.app_context():
        today = datetime.now(UTC).date()
        for day in partitions.partition_days():
            if day < today:
                partitions.drop_day(day)


@pytest.fixture
def three_days(make_app):
    """Day 1: a task finished 31 days ago; day 2: one finished 10 days ago; day 3: one
    still scheduled."""
    app = make_app(**SETTINGS)
    with app.app_context():
        old = _task_of_day(DAYS[0], [1, 2, 3])
        recent = _task_of_day(DAYS[1], [4, 5, 6])
        waiting = _task_of_day(DAYS[2], [7, 8, 9], run=False)
        _finished_days_ago(old, 31)
        _finished_days_ago(recent, 10)
        yield app, (old, recent, waiting)


def test_a_tasks_ids_go_to_the_partition_of_its_day_made_by_planning(three_days):
    app, tasks = three_days
    with app.app_context():
        where = [_partitions_of(task_id) for task_id in tasks]
        statuses = [db.session.get(IdTask, task_id).status for task_id in tasks]
    assert where == [["assignments_20260105"], ["assignments_20260106"], ["assignments_20260107"]]
    assert statuses == ["done", "done", "scheduled"]


def test_a_finished_task_records_when_it_finished(make_app):
    app = make_app(**SETTINGS)
    with app.app_context():
        task_id = _task_of_day(DAYS[0], [1, 2])
        task = db.session.get(IdTask, task_id)
        finished, now = task.finished_at, datetime.now(UTC)
    assert now - timedelta(seconds=30) < finished <= now


def test_retention_drops_the_day_whose_tasks_finished_long_ago_and_keeps_the_rest(three_days):
    app, (old, recent, waiting) = three_days
    client = app.test_client()
    with app.app_context():
        old_slots = _slots_of(old)
        [recent_slot] = _slots_of(recent)
        _add_events(finished_days_ago=[40, 5])
        upkeep = keep_days()
        events_left = db.session.scalars(text("SELECT reason FROM limit_events ORDER BY id")).all()
        left = partitions.partition_days()
        task = db.session.get(IdTask, old)
        counts = (task.status, task.total, task.done, task.failed, task.planned)
        first_last = (task.first_slot, task.last_slot)
        stored_ids = db.session.scalar(
            text("SELECT count(*) FROM task_id_chunks WHERE task_id = :t"), {"t": old}
        )
    assert upkeep.removed == [DAYS[0]]
    assert upkeep.tasks == 1
    assert DAYS[0] not in left and DAYS[1] in left and DAYS[2] in left
    assert counts == ("done", 3, 3, 0, 3)
    assert first_last == (old_slots[0], old_slots[-1])
    assert stored_ids == 0
    assert (upkeep.events, events_left) == (1, ["finished 5 days ago"])
    page = client.get(f"/plan/tasks/{old}").get_data(as_text=True)
    assert "Its IDs were removed on" in page

    gone = client.get(f"/celery_ids_tasks/{old}/ids/")
    assert gone.status_code == 410
    assert "were removed on" in gone.json["message"]
    shown = client.get(f"/celery_ids_tasks/{old}/").json
    assert shown["ids_removed_at"] is not None
    assert (shown["done"], shown["first_slot"]) == (3, old_slots[0].isoformat())
    for kept in (recent, waiting):
        assert len(client.get(f"/celery_ids_tasks/{kept}/ids/").json) == 3
        assert client.get(f"/celery_ids_tasks/{kept}/").json["ids_removed_at"] is None

    # The removed day's slots are empty in the plan; the next day's keep their counts.
    plan = client.get("/slots/", query_string={"from": old_slots[0].isoformat()}).json
    assert _load_and_done(plan, old_slots[0]) == (0, 0)
    plan = client.get("/slots/", query_string={"from": recent_slot.isoformat()}).json
    assert _load_and_done(plan, recent_slot) == (3, 3)

    # Nothing more goes at the next run, and the removed task cannot be planned again.
    with app.app_context():
        assert keep_days().removed == []
    changed = client.patch(f"/celery_ids_tasks/{old}/", json={"overflow": "defer"})
    assert changed.status_code == 409
    assert "cannot be planned again" in changed.json["message"]


def test_a_day_is_kept_while_one_of_its_tasks_is_unfinished_or_finished_lately(three_days):
    app, (old, recent, waiting) = three_days
    with app.app_context():
        _finished_days_ago(recent, 29)  # a day short of the retention
        upkeep = keep_days()
        removed_marks = db.session.scalars(
            text("SELECT id FROM id_tasks WHERE ids_removed_at IS NOT NULL ORDER BY id")
        ).all()
    assert upkeep.removed == [DAYS[0]]
    assert removed_marks == [old]


def test_the_retention_setting_decides_how_long(three_days, make_app):
    _, (old, recent, _) = three_days
    app = make_app(**{**SETTINGS, "RETENTION_DAYS": 366})
    with app.app_context():
        assert keep_days().removed == []
        assert keep_days(now=datetime.now(UTC) + timedelta(days=356)).removed == DAYS[:2]


def test_partitions_are_made_ahead_of_today(app):
    today = datetime.now(UTC).date()
    tomorrow = today + timedelta(days=1)
    with app.app_context():
        partitions.drop_day(tomorrow + timedelta(days=1))
        upkeep = keep_days()
        days = partitions.partition_days()
    assert upkeep.made == [tomorrow + timedelta(days=1)]
    assert {today, tomorrow, tomorrow + timedelta(days=1)} <= set(days)


def test_a_day_whose_tasks_were_marked_but_not_dropped_goes_at_the_next_run(make_app):
    """A scheduler that died between marking a day's tasks and dropping its partition."""
    app = make_app(**SETTINGS)
    with app.app_context():
        task_id = _task_of_day(DAYS[0], [1])
        _finished_days_ago(task_id, 40)
        db.session.execute(
            text("UPDATE id_tasks SET ids_removed_at = clock_timestamp() WHERE id = :t"),
            {"t": task_id},
        )
        db.session.commit()
        upkeep = keep_days()
        days = partitions.partition_days()
    assert upkeep.removed == [DAYS[0]]
    assert DAYS[0] not in days


def test_the_cli_runs_retention_as_of_a_moment(make_app):
    app = make_app(**SETTINGS)
    runner = app.test_cli_runner()
    with app.app_context():
        task_id = _task_of_day(DAYS[0], [1, 2])
    moment = (at("2026-01-05 00:00") + timedelta(days=60)).strftime("%Y-%m-%d %H:%M")
    result = runner.invoke(args=["plan", "retention", "--as-of", moment])
    assert result.exit_code == 0, result.output
    # Finished today (the real one): not yet 30 days before a moment in January.
    assert "days removed: none (0 tasks)" in result.output
    with app.app_context():
        _finished_days_ago(task_id, 60)
    result = runner.invoke(args=["plan", "retention"])
    assert "days removed: 2026-01-05 (1 tasks)" in result.output, result.output


def test_the_schedulers_maintenance_keeps_the_days_and_goes_on_when_that_fails(
    app, monkeypatch, caplog
):
    from service import cli

    tomorrow = datetime.now(UTC).date() + timedelta(days=1)
    reconciled = []
    monkeypatch.setattr(cli, "reconcile", lambda after_outage: reconciled.append(after_outage))
    with app.app_context():
        partitions.drop_day(tomorrow)
        cli._maintenance()
        made_again = tomorrow in partitions.partition_days()

        def broken(now=None):
            raise RuntimeError("retention broke")

        monkeypatch.setattr(cli.retention, "keep_days", broken)
        cli._maintenance()
    assert made_again
    assert reconciled == [False, False]  # reconcile ran after the failed retention too
    assert "retention failed" in caplog.text


def test_a_drop_held_up_by_a_reader_gives_up_and_the_next_run_finishes_it(make_app):
    """A transaction still reading `assignments` holds up the concurrent detach past its
    lock timeout: the day is left detached half way, and the next run finishes it."""
    app = make_app(**SETTINGS)
    with app.app_context():
        task_id = _task_of_day(DAYS[0], [1, 2])
        _finished_days_ago(task_id, 40)
        with db.engine.connect() as reader:
            reader.execute(text("SELECT count(*) FROM assignments")).scalar()
            with pytest.raises(Exception) as held_up:
                keep_days()
            reader.rollback()
        half_way = partitions.partition_days().get(DAYS[0])
        db.session.rollback()
        upkeep = keep_days()
        days = partitions.partition_days()
    assert lock_not_granted(held_up.value)
    assert half_way is True  # detached, pending its finish
    assert upkeep.removed == [DAYS[0]]
    assert DAYS[0] not in days


def _partitions_read(statement: str, params: dict) -> set[str]:
    """The partitions of `assignments` that a statement's plan actually read."""
    [[plan]] = db.session.execute(text(f"EXPLAIN (ANALYZE, FORMAT JSON) {statement}"), params).all()
    db.session.rollback()
    read, nodes = set(), [plan[0]["Plan"]]
    while nodes:
        node = nodes.pop()
        nodes.extend(node.get("Plans", []))
        name = node.get("Relation Name", "")
        if name.startswith("assignments_") and node.get("Actual Loops", 0) > 0:
            read.add(name)
    return read


def test_claimed_rows_carry_their_day_and_a_move_reads_only_that_partition(make_app):
    """With a month of days kept, rows named by key are looked for in their task's day
    only: a re-plan's move of a group costs what it costs with one day kept. (Without
    the day in the join, each key was looked for in every day's primary key.)"""
    from service.dispatch import claims
    from service.planning import store as planning_store

    app = make_app(**SETTINGS)
    with app.app_context():
        task_id = _task_of_day(DAYS[0], [1, 2, 3], run=False)
        partitions.ensure_days(DAYS[0] + timedelta(days=n) for n in range(1, 30))
        # Days with rows of their own, as a month of work leaves them.
        db.session.execute(
            text(
                "INSERT INTO assignments (task_id, position, user_id, limit_id, slot_start, "
                "status, task_day) "
                "SELECT 1000 + d, p, p, 1, :start + d * interval '1 day', 'done', "
                "CAST(:first AS date) + d FROM generate_series(1, 29) AS d, "
                "generate_series(1, 2000) AS p"
            ),
            {"start": midnight(DAYS[0]), "first": DAYS[0]},
        )
        db.session.commit()
        with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as admin:
            admin.execute(text("ANALYZE assignments"))
        [slot] = _slots_of(task_id)
        limit_id = db.session.get(IdTask, task_id).limit_id
        batch = claims.claim(limit_id, slot, 7, 10, slot_seconds=1)
        keys = claims.claim_keys(batch.claims)
        moved = _partitions_read(
            planning_store.REPLACE_ROWS.text,
            {
                "event": 1,
                "tasks": keys["tasks"],
                "positions": keys["positions"],
                "days": keys["days"],
                "slots": [int(slot.timestamp())] * 3,
            },
        )
    assert len(batch.claims) == 3
    assert {claim.task_day for claim in batch.claims} == {DAYS[0]}
    assert moved == {"assignments_20260105"}, moved
