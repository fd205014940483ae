"""Re-planning at a learned rate: the limit's pending IDs in slots not yet started are
placed again at the new capacity, by the fill rule, in time order; no started slot is
touched, no slot goes above the capacity, every ID stays once; tasks' slots follow."""

from collections import Counter
from datetime import timedelta

import pytest
from sqlalchemy import text

from service.core.extensions import db
from service.core.models import IdTask
from service.limits import store as limits
from service.planning import replan
from service.planning.planner import fill_from
from service.planning.replan import replan_limit
from service.planning.windows import plan_stored_task

from ..helpers import FIRST_SLOT, PAST, add_limit, at, loads, submit


def slot(m: int):
    return FIRST_SLOT + timedelta(minutes=m)


# 09:00 to 09:02 have started; 09:03 on are open.
LATER = at("2026-01-05 09:02:20")


@pytest.fixture
def partner(rpm3):
    """A limit of RPM 4 holding tasks A and B of 20 IDs each, four a slot, 09:00 to
    09:09; returns their ids."""
    add_limit("partner", 4)
    first = submit(range(1, 21), overflow="defer", limit="partner")
    plan_stored_task(first, now=PAST)
    second = submit(range(101, 121), overflow="defer", limit="partner")
    plan_stored_task(second, now=PAST)
    return first, second


def learn(rpm: int | None, limit: str = "partner") -> int:
    """The limit's learned rate set as a refusal (or a quiet period) would; returns the
    event that asks for its re-plan."""
    limit_id = limits.find(limit).id
    event = limits.new_event(limit_id, "lowered", "a test", 4, rpm or 4)
    limits.set_learned(limit_id, rpm, None, event)
    db.session.commit()
    return event


def rows(*task_ids):
    """(task, position, user, slot, status) of the tasks' rows, in time order."""
    return db.session.execute(
        text(
            "SELECT task_id, position, user_id, slot_start, status, replanned_in "
            "FROM assignments WHERE task_id = ANY(:t) ORDER BY slot_start, task_id, position"
        ),
        {"t": list(task_ids)},
    ).all()


def by_slot(found) -> Counter:
    return Counter(row.slot_start for row in found)


def test_a_drop_places_the_pending_ids_of_open_slots_at_the_new_capacity(partner):
    first, second = partner
    before = rows(first, second)
    started = [row for row in before if row.slot_start < slot(3)]
    event = learn(2)

    outcome = replan_limit(limits.find("partner").id, event, now=LATER)

    after = rows(first, second)
    # The started slots kept theirs; from 09:03 on two a slot, in the order they had.
    assert [row for row in after if row.slot_start < slot(3)] == started
    moved = [row for row in after if row.slot_start >= slot(3)]
    assert by_slot(moved) == {slot(m): 2 for m in range(3, 17)}
    waiting = [row for row in before if row.slot_start >= slot(3)]
    assert [(r.task_id, r.position) for r in moved] == [(r.task_id, r.position) for r in waiting]
    assert len({(r.task_id, r.position) for r in after}) == len(before) == 40
    # Loads follow the rows, and the slots that took IDs say so.
    assert loads(slot(0), slot(30), "partner") == dict(by_slot(after))
    assert outcome.placed == 28 and outcome.moved == 26  # 09:03's first two stayed
    event_row = db.session.execute(
        text("SELECT moved, finished_at FROM limit_events WHERE id = :e"), {"e": event}
    ).one()
    assert event_row.moved == 26 and event_row.finished_at is not None
    # A's eight waiting IDs now end at 09:06 (it was 09:04); B follows, 09:07 to 09:16.
    tasks = {task.id: task for task in db.session.query(IdTask)}
    assert (tasks[first].first_slot, tasks[first].last_slot) == (slot(0), slot(6))
    assert (tasks[second].first_slot, tasks[second].last_slot) == (slot(7), slot(16))


def test_a_rise_moves_ids_earlier_into_the_capacity_that_opened(partner):
    first, second = partner
    replan_limit(limits.find("partner").id, learn(2), now=LATER)
    event = learn(3)

    replan_limit(limits.find("partner").id, event, now=LATER)

    after = rows(first, second)
    moved = [row for row in after if row.slot_start >= slot(3)]
    assert by_slot(moved) == {**{slot(m): 3 for m in range(3, 12)}, slot(12): 1}
    tasks = {task.id: task for task in db.session.query(IdTask)}
    assert tasks[second].last_slot == slot(12)
    held = {start: load for start, load in loads(slot(0), slot(30), "partner").items() if load}
    assert held == dict(by_slot(after))


def test_small_chunks_give_the_same_plan_as_one(partner, monkeypatch):
    first, second = partner
    monkeypatch.setattr(replan, "CHUNK_ROWS", 3)
    outcome = replan_limit(limits.find("partner").id, learn(2), now=LATER)

    after = rows(first, second)
    assert by_slot([r for r in after if r.slot_start >= slot(3)]) == {
        slot(m): 2 for m in range(3, 17)
    }
    assert outcome.transactions >= 10
    assert loads(slot(0), slot(30), "partner") == dict(by_slot(after))


def test_a_newer_change_stops_an_older_re_plan(partner):
    older = learn(2)
    newer = learn(1)
    outcome = replan_limit(limits.find("partner").id, older, now=LATER)
    assert outcome.superseded and outcome.placed == 0
    replan_limit(limits.find("partner").id, newer, now=LATER)
    first, second = partner
    moved = [r for r in rows(first, second) if r.slot_start >= slot(3)]
    assert by_slot(moved) == {slot(m): 1 for m in range(3, 31)}


def test_a_spread_task_is_placed_under_the_cap_too(rpm3):
    add_limit("partner", 4)
    task = submit(range(1, 81), limit="partner")  # spread: 80 IDs over 15 slots
    plan_stored_task(task, now=PAST)
    assert max(loads(slot(0), slot(15), "partner").values()) > 4

    replan_limit(limits.find("partner").id, learn(2), now=LATER)

    found = rows(task)
    assert max(by_slot([r for r in found if r.slot_start >= slot(3)]).values()) == 2
    assert len(found) == 80


def test_a_rise_never_moves_an_id_before_its_tasks_not_before(partner):
    first, second = partner
    later = submit(range(201, 205), overflow="defer", limit="partner", not_before=slot(20))
    plan_stored_task(later, now=PAST)
    replan_limit(limits.find("partner").id, learn(2), now=LATER)
    replan_limit(limits.find("partner").id, learn(3), now=LATER)
    placed = rows(later)
    assert min(row.slot_start for row in placed) >= slot(20)
    assert len(placed) == 4


def test_fill_from_keeps_order_bounds_and_the_cap():
    placed = list(fill_from("abcdef", [0, 0, 3, 0, 0, 5], [1, 0, 0, 0, 0, 0], 2))
    # a, b fill what slot 0 has left and slot 1; c waits for slot 3; d and e follow it
    # (never before the one placed before); f waits for slot 5.
    assert placed == [("a", 0), ("b", 1), ("c", 3), ("d", 3), ("e", 4), ("f", 5)]
    assert list(fill_from("abc", [0, 0, 9], [2, 2], 2)) == []  # no room at all
    assert list(fill_from("abc", [0, 0, 0], [1, 2], 2)) == [("a", 0)]
