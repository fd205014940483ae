"""Pacing: each ID at its turn, from when the slot really starts; driven by a fake clock."""

from datetime import timedelta

import pytest

from service.dispatch.claimers import new_claimer_id, release_held_by
from service.dispatch.claims import claim
from service.dispatch.pacing import Clock, paced_groups, step_of
from service.dispatch.slot_runs import run_slot
from service.limits.store import DEFAULT
from service.planning.windows import plan_stored_task

from .. import processors
from ..helpers import at, limit_id, slots_by_id, submit

PAST = at("2026-01-05 08:59:50")
SLOT = at("2026-01-05 09:00")


class FakeClock(Clock):
    """Time moves only when someone sleeps."""

    def __init__(self, start: float):
        object.__setattr__(self, "now_seconds", start)
        super().__init__(seconds=lambda: self.now_seconds, sleep=self._advance)

    def _advance(self, seconds: float) -> None:
        object.__setattr__(self, "now_seconds", self.now_seconds + seconds)


def noting(make_app, rpm: int):
    """An app whose processor notes when each ID reaches it, its context pushed."""
    app = make_app(RPM=rpm, ID_PROCESSOR="tests.processors:note_times")
    processors.calls = []
    with app.app_context():
        yield app
    processors.clock = None


@pytest.fixture
def noted(make_app):
    yield from noting(make_app, 600)


@pytest.fixture
def noted_twenty_a_slot(make_app):
    """Twenty IDs a slot: enough that pacing over the whole slot would hand the last one
    out well past 90 % of it."""
    yield from noting(make_app, 20)


def most_in_one_second(calls) -> int:
    times = [moment for moment, ids in calls for _ in ids]
    return max(sum(1 for t in times if start <= t < start + 1) for start in times)


def test_a_slot_starting_30_s_late_paces_its_ids_from_then(noted):
    plan_stored_task(submit(range(1, 601)), now=PAST)
    start = SLOT.timestamp() + 30
    processors.clock = FakeClock(start)
    assert run_slot(DEFAULT, SLOT, clock=processors.clock).processed == 600
    step = step_of(60, 600)  # 0.09 s: the same step as on time
    first_time, first_ids = processors.calls[0]
    assert first_time == pytest.approx(start, abs=0.01)
    assert len(first_ids) <= 5  # a quarter second's catch-up, not 334 overdue IDs
    assert most_in_one_second(processors.calls) <= round(1 / step) + 5
    last_time = processors.calls[-1][0]
    assert last_time - start == pytest.approx(599 * step - 0.25, abs=0.2)


def test_a_slot_on_time_spreads_its_ids_through_it(noted):
    plan_stored_task(submit(range(1, 601)), now=PAST)
    processors.clock = FakeClock(SLOT.timestamp())
    run_slot(DEFAULT, SLOT, clock=processors.clock)
    offsets = [moment - SLOT.timestamp() for moment, ids in processors.calls for _ in ids]
    step = step_of(60, 600)
    assert all(abs(offset - k * step) <= 0.06 for k, offset in enumerate(offsets)), offsets[:20]


def test_a_slots_ids_are_handed_out_evenly_through_the_whole_slot(noted_twenty_a_slot):
    """The same gap between any two calls, across the slot's end too: the last ID is
    one step before the next slot's first."""
    plan_stored_task(submit(range(1, 21)), now=PAST)
    processors.clock = FakeClock(SLOT.timestamp())
    run_slot(DEFAULT, SLOT, clock=processors.clock)
    offsets = [moment - SLOT.timestamp() for moment, ids in processors.calls for _ in ids]
    # The step is written out here, not read from the code under test.
    assert offsets == pytest.approx([k * 60 / 20 for k in range(20)], abs=0.1)
    assert 60 - offsets[-1] == pytest.approx(3.0, abs=0.1)


def test_ids_handed_back_get_turns_after_those_already_handed_out(noted):
    plan_stored_task(submit(range(1, 601)), now=PAST)
    now = SLOT + timedelta(seconds=2)
    dead_claimer = new_claimer_id()
    dead = claim(limit_id(), SLOT, dead_claimer, 11, now)
    assert release_held_by(dead_claimer) == 11  # its worker died
    again = claim(limit_id(), SLOT, new_claimer_id(), 11, now + timedelta(seconds=0.1))
    assert [c.position for c in again.claims] == [c.position for c in dead.claims]
    assert again.first_turn == pytest.approx(dead.first_turn + 11 * dead.step)
    assert dead.first_turn == pytest.approx(now.timestamp() - 0.25)


def test_paced_groups_stop_when_a_stop_is_requested():
    clock = FakeClock(100.0)
    groups = []
    for turn, group in paced_groups(list(range(10)), 100.0, 1.0, clock, lambda: bool(groups)):
        groups.append((turn, group))
    assert groups == [(100.0, [0])]
    assert clock.seconds() == 100.0  # it did not wait for the next turn


def test_per_id_calls_start_at_their_own_turns_never_ahead_across_a_slots_end(make_app):
    """Ten IDs a 1-s slot, two slots: each call starts at its own turn (slot start plus
    its place times 0.1 s) or after it, never ahead, and the tenth of a slot comes in
    its last tenth: the gap at the slot's end is the same as inside it."""
    app = make_app(
        RPM=10,
        SLOT_SECONDS=1,
        WINDOW_SLOTS=5,
        PLAN_LEAD_SECONDS=0.2,
        ID_PROCESSOR="tests.processors:note_call_start",
    )
    processors.call_starts = {}
    with app.app_context():
        task_id = submit(range(1, 21), overflow="defer")
        plan_stored_task(task_id)
        planned = slots_by_id(task_id)
        slots = sorted(set(planned.values()))
        for slot in slots:
            run_slot(DEFAULT, slot)
    assert len(slots) == 2
    for user_id, started in processors.call_starts.items():
        place = (user_id - 1) % 10
        turn = planned[user_id].timestamp() + place * 0.1
        assert started >= turn - 0.005, (user_id, started - turn)
    last_of_first = processors.call_starts[10] - slots[0].timestamp()
    assert 0.895 <= last_of_first < 1.5
