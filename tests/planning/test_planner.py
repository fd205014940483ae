"""The planner on its own: DESIGN.md's worked examples, then properties."""

from datetime import datetime, timedelta
from itertools import count

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.planning.planner import SlotGrid, distribute, fill

from ..helpers import at


def slots_of(pairs, n):
    """The IDs each slot index received, in order."""
    by_slot = [[] for _ in range(n)]
    for user_id, index in pairs:
        by_slot[index].append(user_id)
    return by_slot


def test_rpm_5_fills_fifteen_slots_then_wraps_round():
    plan = dict(distribute(range(1, 92), [0] * 15, 5))
    assert [plan[i] for i in range(1, 6)] == [0] * 5
    assert [plan[i] for i in range(6, 11)] == [1] * 5
    assert [plan[i] for i in range(71, 76)] == [14] * 5
    assert [plan[i] for i in range(76, 91)] == list(range(15))
    assert plan[91] == 0


def test_rpm_2_example_with_ids_1001_to_1050():
    plan = dict(distribute(range(1001, 1051), [0] * 15, 2))
    assert (plan[1001], plan[1002], plan[1003], plan[1004]) == (0, 0, 1, 1)
    assert (plan[1029], plan[1030]) == (14, 14)
    assert [plan[i] for i in range(1031, 1046)] == list(range(15))
    assert plan[1046] == 0


def test_live_window_with_two_tasks():
    # RPM 5 at 10:05:20: open slots 10:06..10:14; 10:06 holds 5, 10:07 holds 3.
    loads = [5, 3, 0, 0, 0, 0, 0, 0, 0]
    task_a = [f"a{i}" for i in range(1, 21)]
    by_slot = slots_of(distribute(task_a, loads, 5), 9)
    assert by_slot == [
        [],
        ["a1", "a2"],
        ["a3", "a4", "a5", "a6", "a7"],
        ["a8", "a9", "a10", "a11", "a12"],
        ["a13", "a14", "a15", "a16", "a17"],
        ["a18", "a19", "a20"],
        [],
        [],
        [],
    ]
    loads = [load + len(ids) for load, ids in zip(loads, by_slot)]
    assert loads == [5, 5, 5, 5, 5, 3, 0, 0, 0]

    task_b = [f"b{i}" for i in range(1, 21)]
    by_slot = slots_of(distribute(task_b, loads, 5), 9)
    assert by_slot[5] == ["b1", "b2"]
    assert by_slot[6:] == [
        ["b3", "b4", "b5", "b6", "b7"],
        ["b8", "b9", "b10", "b11", "b12"],
        ["b13", "b14", "b15", "b16", "b17"],
    ]
    assert by_slot[:3] == [["b18"], ["b19"], ["b20"]]
    assert [load + len(ids) for load, ids in zip(loads, by_slot)] == [6, 6, 6, 5, 5, 5, 5, 5, 5]


def test_live_window_with_defer_moves_on_to_the_next_window():
    b_ids = iter([f"b{i}" for i in range(1, 21)])
    first = slots_of(fill(b_ids, [5, 5, 5, 5, 5, 3, 0, 0, 0], 5), 9)
    assert first[5] == ["b1", "b2"] and first[8] == ["b13", "b14", "b15", "b16", "b17"]
    second = slots_of(fill(b_ids, [0] * 15, 5), 15)
    assert second[0] == ["b18", "b19", "b20"]


def test_distribute_leaves_the_callers_loads_alone():
    loads = [1, 2, 3]
    list(distribute(range(100), loads, 2))
    assert loads == [1, 2, 3]


@pytest.mark.parametrize(("loads", "rpm"), [([0], 0), ([0], -1), ([], 5)])
def test_invalid_arguments_raise_at_once(loads, rpm):
    with pytest.raises(ValueError):
        distribute([1], loads, rpm)
    with pytest.raises(ValueError):
        fill(iter([1]), loads, rpm)


def test_one_id_is_consumed_per_pair():
    source = count(1)
    pairs = distribute(source, [0, 0], 1)
    assert [next(pairs) for _ in range(5)] == [(1, 0), (2, 1), (3, 0), (4, 1), (5, 0)]
    assert next(source) == 6  # nothing was read ahead


def test_fill_takes_no_id_it_cannot_place():
    source = iter(range(10))
    assert list(fill(source, [1, 2], 2)) == [(0, 0)]
    assert next(source) == 1


def test_distribute_works_on_an_endless_stream_without_growing():
    pairs = distribute(count(), [0] * 15, 120)
    for _ in range(200_000):
        next(pairs)
    assert next(pairs) == (200_000, (200_000 - 1800) % 15)


loads_strategy = st.lists(st.integers(min_value=0, max_value=12), min_size=1, max_size=15)
# Any window's loads, a small RPM and up to a few rounds of IDs.
any_window = given(
    loads=loads_strategy,
    rpm=st.integers(min_value=1, max_value=10),
    n=st.integers(min_value=0, max_value=300),
)


@any_window
def test_each_id_is_yielded_once_in_order(loads, rpm, n):
    pairs = list(distribute(range(n), loads, rpm))
    assert [user_id for user_id, _ in pairs] == list(range(n))
    assert all(0 <= index < len(loads) for _, index in pairs)


@any_window
def test_no_slot_passes_rpm_while_another_is_below_it(loads, rpm, n):
    current = list(loads)
    for _, index in distribute(range(n), loads, rpm):
        if current[index] >= rpm:
            assert min(current) >= rpm  # overflow only once every slot is full
        current[index] += 1


@any_window
def test_spread_picks_the_lowest_slot_earliest_first(loads, rpm, n):
    current = list(loads)
    for _, index in distribute(range(n), loads, rpm):
        if min(current) >= rpm:
            lowest = min(current)
            assert index == current.index(lowest)
        current[index] += 1


@given(
    rpm=st.integers(min_value=1, max_value=10),
    slots=st.integers(min_value=1, max_value=15),
    n=st.integers(min_value=0, max_value=400),
)
def test_after_a_spread_loads_differ_by_at_most_one(rpm, slots, n):
    current = [0] * slots
    for _, index in distribute(range(n), current, rpm):
        current[index] += 1
    if n >= rpm * slots:
        assert max(current) - min(current) <= 1
    assert sum(current) == n


@given(
    loads=loads_strategy,
    rpm=st.integers(min_value=1, max_value=12),
    n=st.integers(min_value=0, max_value=300),
)
def test_fill_never_passes_rpm(loads, rpm, n):
    current = list(loads)
    source = iter(range(n))
    placed = 0
    for _, index in fill(source, loads, rpm):
        current[index] += 1
        placed += 1
        assert current[index] <= rpm
    room = sum(max(0, rpm - load) for load in loads)
    assert placed == min(n, room)


GRID = SlotGrid(slot_seconds=60, window_slots=15, lead_seconds=2)


def test_slot_and_window_of_a_moment():
    assert GRID.slot_of(at("2026-11-29 10:07:20")) == at("2026-11-29 10:07:00")
    assert GRID.window_of(at("2026-11-29 10:07:20")) == at("2026-11-29 10:00:00")
    assert GRID.window_of(at("2026-11-29 10:59:59")) == at("2026-11-29 10:45:00")
    assert GRID.next_window(at("2026-11-29 10:45:00")) == at("2026-11-29 11:00:00")


def test_a_span_of_windows_is_aligned_as_windows_are():
    assert GRID.span_of(at("2026-11-29 10:59:59"), 4) == at("2026-11-29 10:00:00")
    short = SlotGrid(slot_seconds=2, window_slots=5)
    assert short.span_of(at("2026-11-29 10:01:59"), 12) == at("2026-11-29 10:00:00")
    assert short.span_of(at("2026-11-29 10:02:00"), 12) == at("2026-11-29 10:02:00")


def test_open_slots_of_the_live_window_example():
    slots = GRID.open_slots(at("2026-11-29 10:00"), at("2026-11-29 10:07:20"))
    assert slots[0] == at("2026-11-29 10:08") and slots[-1] == at("2026-11-29 10:14")
    assert len(slots) == 7


def test_a_slot_within_the_lead_is_closed():
    assert not GRID.is_open(at("2026-11-29 10:08:00"), at("2026-11-29 10:07:58"))
    assert GRID.is_open(at("2026-11-29 10:08:00"), at("2026-11-29 10:07:57.9"))


def test_late_in_a_window_the_current_one_still_has_one_open_slot():
    slots = GRID.open_slots(at("2026-11-29 10:00"), at("2026-11-29 10:13:30"))
    assert slots == [at("2026-11-29 10:14")]


def test_target_window_moves_on_when_the_current_one_is_closed():
    assert GRID.target_window(at("2026-11-29 10:07:20")) == at("2026-11-29 10:00")
    assert GRID.target_window(at("2026-11-29 10:14:30")) == at("2026-11-29 10:15")
    assert GRID.target_window(at("2026-11-29 10:13:59")) == at("2026-11-29 10:15")


def test_a_later_start_makes_its_window_the_first_and_closes_earlier_slots():
    now, not_before = at("2026-11-29 10:07:20"), at("2026-11-29 10:37:30")
    assert GRID.target_window(now, not_before) == at("2026-11-29 10:30")
    slots = GRID.open_slots(at("2026-11-29 10:30"), now, not_before)
    assert slots == [at("2026-11-29 10:38") + timedelta(minutes=m) for m in range(7)]
    # A start on a slot's boundary may use that slot.
    assert GRID.is_open(at("2026-11-29 10:38"), now, at("2026-11-29 10:38"))


def test_a_start_in_the_past_or_within_the_lead_changes_nothing_of_the_lead():
    now = at("2026-11-29 10:07:59")
    assert GRID.open_slots(at("2026-11-29 10:00"), now, at("2026-11-29 09:00")) == [
        at("2026-11-29 10:08") + timedelta(minutes=m) for m in range(1, 7)
    ]
    assert not GRID.is_open(at("2026-11-29 10:08"), now, at("2026-11-29 10:08"))
    # A start late in its window: the window holding it is closed, the next one comes.
    assert GRID.target_window(now, at("2026-11-29 10:44:30")) == at("2026-11-29 10:45")


def test_short_slots_align_windows_to_their_length():
    grid = SlotGrid(slot_seconds=2, window_slots=5, lead_seconds=0.5)
    assert grid.window_of(at("2026-11-29 10:00:13")) == at("2026-11-29 10:00:10")
    assert grid.slots_of_window(at("2026-11-29 10:00:10"))[-1] == at("2026-11-29 10:00:18")


def test_naive_datetimes_are_refused():
    with pytest.raises(ValueError, match="naive"):
        GRID.slot_of(datetime(2026, 11, 29, 10, 7))
