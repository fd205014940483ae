"""A learned rate on the plan: /slots/ and the plan pages draw each slot against it (never
above RPM), say it beside RPM, and mark the slots that took IDs from a re-plan."""

import html
from datetime import datetime, timedelta

from sqlalchemy import text

from service.core.extensions import db
from service.planning.windows import plan_stored_task

from ..helpers import limit_id, submit
from .test_plan_page import Cells, Rows, iso, next_hours_window


def learn(rpm: int) -> None:
    """The default limit's learned rate, as refusals would have left it."""
    db.session.execute(
        text("INSERT INTO learned_rates (limit_id, learned_rpm) VALUES (:limit, :rpm)"),
        {"limit": limit_id(), "rpm": rpm},
    )
    db.session.commit()


def mark_replanned(*slots) -> None:
    db.session.execute(
        text("UPDATE slots SET replanned = true WHERE limit_id = :limit AND slot_start = ANY(:s)"),
        {"limit": limit_id(), "s": list(slots)},
    )
    db.session.commit()


def planned_at_rpm_3_then_learned_2():
    """Six IDs planned at RPM 3 into the window's first two slots, then a learned rate of
    2 and four more IDs, which take its third and fourth slots, marked re-planned."""
    window = next_hours_window()
    plan_stored_task(submit(range(1, 7)), now=window - timedelta(seconds=10))
    learn(2)
    plan_stored_task(submit(range(7, 11)), now=window - timedelta(seconds=10))
    third, fourth = window + timedelta(minutes=2), window + timedelta(minutes=3)
    mark_replanned(third, fourth)
    return window, third, fourth


def test_slots_carry_the_learned_rate_as_capacity_and_say_which_were_replanned(rpm3):
    window, third, fourth = planned_at_rpm_3_then_learned_2()
    plan = rpm3.test_client().get(f"/slots/?from={iso(window)}").json
    assert (plan["rpm"], plan["learned_rpm"]) == (3, 2)
    first = plan["windows"][0]
    slots = {datetime.fromisoformat(slot["start"]): slot for slot in first["slots"]}
    assert {slot["capacity"] for slot in first["slots"]} == {2}
    assert (first["load"], first["capacity"]) == (10, 2 * 15)
    loads = [slots[window + timedelta(minutes=m)]["load"] for m in range(5)]
    assert loads == [3, 3, 2, 2, 0]
    replanned = sorted(start for start, slot in slots.items() if slot["replanned"])
    assert replanned == [third, fourth]


def test_without_a_learned_rate_slots_take_rpm_and_none_is_replanned(rpm3):
    window = next_hours_window()
    plan_stored_task(submit(range(1, 7)), now=window - timedelta(seconds=10))
    plan = rpm3.test_client().get(f"/slots/?from={iso(window)}").json
    assert (plan["rpm"], plan["learned_rpm"]) == (3, 3)
    slots = [slot for window in plan["windows"] for slot in window["slots"]]
    assert {slot["capacity"] for slot in slots} == {3}
    assert plan["windows"][0]["capacity"] == 3 * 15
    assert not any(slot["replanned"] for slot in slots)


def test_a_learned_rate_above_rpm_counts_as_rpm(rpm3):
    # Learned at 5 when the limit took 5; the operator then set RPM 3.
    learn(5)
    plan = rpm3.test_client().get("/slots/").json
    assert (plan["rpm"], plan["learned_rpm"]) == (3, 3)
    assert {slot["capacity"] for w in plan["windows"] for slot in w["slots"]} == {3}


def test_the_plan_page_says_the_learned_rate_and_marks_replanned_slots(rpm3):
    window, third, fourth = planned_at_rpm_3_then_learned_2()
    page = rpm3.test_client().get("/plan").text
    assert "RPM 3 · " in page
    assert '<span class="learned"' in page and ">learned 2</span>" in page
    assert "adaptation off" not in page
    assert "re-planned: took IDs moved when the learned rate changed" in page  # the legend
    cells = Cells(page)
    replanned = sorted(slot for slot, classes in cells.classes.items() if "replanned" in classes)
    assert replanned == [iso(third), iso(fourth)]
    # Drawn against the learned rate: the slots planned at RPM 3 are above it.
    over = sorted(slot for slot, classes in cells.classes.items() if "over" in classes)
    assert over == [iso(window), iso(window + timedelta(minutes=1))]
    assert "shade-4" in cells.classes[iso(third)]
    titles = html.unescape(page)
    assert "load 2 of learned rate 2; done 0, failed 0, pending 2; re-planned" in titles
    assert 'load 3 of learned rate 2; done 0, failed 0, pending 3"' in titles
    # Each window's load of its capacity: 15 slots of 2.
    assert '<span class="window-total">10 / 30</span>' in page
    assert " / 45</span>" not in page


def test_the_plan_page_without_a_learned_rate_is_as_before(rpm3):
    window = next_hours_window()
    plan_stored_task(submit(range(1, 7)), now=window - timedelta(seconds=10))
    page = rpm3.test_client().get("/plan").text
    assert "RPM 3 · slots of 60 s" in page
    assert 'class="learned"' not in page
    assert "load up to RPM" in page and "above RPM" in page
    assert "load 3 of RPM 3;" in html.unescape(page)
    assert not any("replanned" in classes for classes in Cells(page).classes.values())
    assert not any("over" in classes for classes in Cells(page).classes.values())


def test_the_plan_page_says_when_adaptation_is_off_and_when_the_limit_is_held(rpm3):
    db.session.execute(
        text(
            "UPDATE limits SET adaptive = false, held_since = '2026-01-05 09:00+00' "
            "WHERE id = :limit"
        ),
        {"limit": limit_id()},
    )
    db.session.commit()
    page = rpm3.test_client().get("/plan").text
    assert 'RPM 3 · <span class="note">adaptation off</span>' in page
    assert "held: found so since 2026-01-05 09:00:00 UTC" in page


def test_the_limits_page_shows_the_learned_rate_beside_rpm(rpm3):
    planned_at_rpm_3_then_learned_2()
    page = rpm3.test_client().get("/plan/limits").text
    name, rpm, state, load, *_ = Rows(page, "limit").rows["default"]
    assert (name, rpm, state) == ("default", "3 · learned 2", "running")
    assert load == "0 / 2"  # the current slot, of the learned rate


def test_the_slot_page_says_its_capacity_and_that_it_was_replanned(rpm3):
    window, third, _ = planned_at_rpm_3_then_learned_2()
    client = rpm3.test_client()
    replanned = html.unescape(client.get(f"/plan/slots/{iso(third)}").text)
    assert "load 2 of learned rate 2 · RPM 3\n" in replanned
    assert "re-planned: took IDs moved when the learned rate changed" in replanned
    over = html.unescape(client.get(f"/plan/slots/{iso(window)}").text)
    assert (
        'load 3 of learned rate 2 · RPM 3 (<span class="failed">above learned rate</span>)' in over
    )
    assert "re-planned" not in over
