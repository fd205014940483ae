"""A downstream's refusals (HTTP 429 and 503, or a processor's `Refused`) are no failure:
the ID uses no attempt and waits for its Retry-After; the limit's learned rate falls at
most once per slot, rises again after a quiet period, and can be reset or switched off."""

import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from service.core.extensions import db, get_redis
from service.core.models import IdTask
from service.dispatch import store as dispatch_store
from service.dispatch.claimers import new_claimer_id
from service.dispatch.claims import claim
from service.dispatch.outcomes import record_outcomes
from service.dispatch.reconcile import reconcile
from service.dispatch.slot_runs import run_slot
from service.jobs import SLOTS_QUEUE, get_queue, replan_job_id
from service.limits import store as limits
from service.limits.learning import lowered, raised, refusal_wait, seen_accepting
from service.limits.store import SlotOfLimit
from service.planning.replan import replan_limit
from service.planning.retries import plan_retries
from service.planning.windows import plan_stored_task
from service.processors.builtin import retry_after_seconds
from service.processors.contract import Refused

from ..downstream import Record, Server
from ..helpers import FIRST_SLOT, PAST, add_limit, at, submit

SECOND_SLOT = FIRST_SLOT + timedelta(minutes=1)
HOUR = timedelta(hours=1)


def rows(task_id: int) -> dict:
    found = db.session.execute(
        text(
            "SELECT user_id, status, attempts, refusals, error, retry_at FROM assignments "
            "WHERE task_id = :t ORDER BY user_id"
        ),
        {"t": task_id},
    )
    return {row.user_id: row for row in found}


def learned(name: str = "partner"):
    return db.session.execute(
        text(
            "SELECT r.* FROM learned_rates AS r JOIN limits AS l ON l.id = r.limit_id "
            "WHERE l.name = :n"
        ),
        {"n": name},
    ).one_or_none()


def events(name: str = "partner") -> list:
    return db.session.execute(
        text(
            "SELECT e.* FROM limit_events AS e JOIN limits AS l ON l.id = e.limit_id "
            "WHERE l.name = :n ORDER BY e.id"
        ),
        {"n": name},
    ).all()


@pytest.fixture
def refusing(rpm3):
    """A limit of RPM 4 whose processor refuses the odd IDs for 30 s."""
    add_limit("partner", 4, "tests.processors:refuse_odd")
    return rpm3


def test_a_refused_id_uses_no_attempt_and_waits_for_its_retry_after(refusing):
    task_id = submit([1, 2, 3, 4], limit="partner")
    plan_stored_task(task_id, now=PAST)
    before = datetime.now(UTC)

    run = run_slot("partner", FIRST_SLOT)

    assert (run.done, run.failed, run.refused) == (2, 0, 2)
    found = rows(task_id)
    assert {u: (r.status, r.attempts, r.refusals) for u, r in found.items()} == {
        1: ("retrying", 0, 1),
        2: ("done", 1, 0),
        3: ("retrying", 0, 1),
        4: ("done", 1, 0),
    }
    waited = (found[1].retry_at - before).total_seconds()
    assert 29 <= waited <= 31
    rate = learned()
    assert (rate.refusals, rate.last_refusal_reason, rate.last_refusal_retry_after) == (
        2,
        "busy: try later",
        30.0,
    )


def test_refusals_lower_the_rate_once_per_slot_and_ask_for_a_re_plan(refusing):
    task_id = submit(range(1, 9), limit="partner")
    plan_stored_task(task_id, now=PAST)
    limit = limits.find("partner")
    first, second = SlotOfLimit.of(limit, FIRST_SLOT), SlotOfLimit.of(limit, SECOND_SLOT)

    def refuse_all(slot):
        claims = claim(limit.id, slot.start, new_claimer_id(), 2).claims
        record_outcomes(slot, claims, {c.user_id: Refused("slow down") for c in claims})

    refuse_all(first)
    refuse_all(first)  # the same burst: counted, but the rate falls once
    assert [(e.kind, e.from_rpm, e.to_rpm) for e in events()] == [("lowered", 4, 2)]
    refuse_all(second)
    assert [(e.kind, e.from_rpm, e.to_rpm) for e in events()] == [
        ("lowered", 4, 2),
        ("lowered", 2, 1),
    ]
    assert (learned().learned_rpm, learned().refusals) == (1, 6)
    queued = get_queue(SLOTS_QUEUE).job_ids
    assert {replan_job_id(e.id) for e in events()} == {j for j in queued if "replan" in j}


def test_a_limit_without_adaptation_only_retries_its_refusals(refusing):
    db.session.execute(text("UPDATE limits SET adaptive = false WHERE name = 'partner'"))
    db.session.commit()
    task_id = submit([1, 2], limit="partner")
    plan_stored_task(task_id, now=PAST)
    run_slot("partner", FIRST_SLOT)
    assert rows(task_id)[1].status == "retrying"
    assert (learned().refusals, learned().learned_rpm) == (1, None)
    assert events() == []


def test_refusals_in_a_row_up_to_max_refusals_fail_the_id(rpm3):
    add_limit("partner", 4, "tests.processors:refuse_every_call")
    db.session.execute(text("UPDATE limits SET max_refusals = 3 WHERE name = 'partner'"))
    task_id = submit([7], limit="partner")
    plan_stored_task(task_id, now=PAST)
    db.session.execute(
        text("UPDATE assignments SET refusals = 2 WHERE task_id = :t"), {"t": task_id}
    )
    db.session.commit()
    run_slot("partner", FIRST_SLOT)
    row = rows(task_id)[7]
    assert (row.status, row.attempts, row.refusals) == ("failed", 0, 3)
    assert row.error == "refused 3 times in a row: no capacity now"


def test_a_lowered_rate_rises_one_step_after_a_quiet_period(rpm3):
    add_limit("partner", 40)
    limit = limits.find("partner")
    quiet = "now() - interval '10 minutes'"
    db.session.execute(
        text(
            "INSERT INTO learned_rates (limit_id, learned_rpm, learned_at, last_refusal_at) "
            f"VALUES (:l, 20, {quiet}, {quiet})"
        ),
        {"l": limit.id},
    )
    db.session.commit()
    plan_stored_task(submit([1, 2], limit="partner"), now=PAST)
    run_slot("partner", FIRST_SLOT)
    assert learned().learned_rpm == 24  # 10 % of 40
    assert [(e.kind, e.from_rpm, e.to_rpm) for e in events()] == [("raised", 20, 24)]
    # The rise was a change: the next one waits for another quiet period.
    plan_stored_task(submit([3], limit="partner"), now=PAST)
    run_slot("partner", SECOND_SLOT)
    assert learned().learned_rpm == 24


def test_the_api_shows_the_learned_rate_and_resets_it(refusing):
    client = refusing.test_client()
    plan_stored_task(submit([1, 2, 3, 4], limit="partner"), now=PAST)
    run_slot("partner", FIRST_SLOT)

    shown = client.get("/limits/partner/").json
    assert (shown["rpm"], shown["learned_rpm"], shown["adaptive"], shown["refusals"]) == (
        4,
        2,
        True,
        2,
    )
    assert shown["last_refusal"]["reason"] == "busy: try later"
    assert shown["last_refusal"]["retry_after"] == 30.0
    listed = client.get(shown["events_url"]).json
    assert [(e["kind"], e["from_rpm"], e["to_rpm"]) for e in listed] == [("lowered", 4, 2)]

    reset = client.patch("/limits/partner/", json={"learned_rpm": None})
    assert (reset.status_code, reset.json["learned_rpm"]) == (200, 4)
    kinds = [e["kind"] for e in client.get(shown["events_url"]).json]
    assert kinds == ["reset", "lowered"]
    refused = client.patch("/limits/partner/", json={"learned_rpm": 3})
    assert (refused.status_code, list(refused.json["errors"])) == (422, ["learned_rpm"])


def test_switching_adaptation_off_puts_the_rate_back_at_rpm(refusing):
    client = refusing.test_client()
    plan_stored_task(submit([1, 2], limit="partner"), now=PAST)
    run_slot("partner", FIRST_SLOT)
    assert client.get("/limits/partner/").json["learned_rpm"] == 2
    off = client.patch("/limits/partner/", json={"adaptive": False})
    assert (off.json["adaptive"], off.json["learned_rpm"]) == (False, 4)


@pytest.mark.parametrize(("header", "status"), [(None, 429), ("7", 429), ("7", 503), ("date", 429)])
def test_429_and_503_are_refusals_with_their_retry_after(make_app, header, status):
    now = datetime.now(UTC)
    if header == "date":  # an HTTP date, 7 s on
        header = (now + timedelta(seconds=8)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    record = Record(answers={2: status}, retry_after=header)
    with Server(record) as url:
        app = make_app(
            ID_PROCESSOR="workers.processors:http_request",
            PROCESSOR_HTTP_URL=url,
            PACING=False,
        )
        with app.app_context():
            task_id = submit([1, 2])
            plan_stored_task(task_id, now=PAST)
            run_slot("default", FIRST_SLOT)
            row = rows(task_id)[2]
            rate = learned("default")
    assert (row.status, row.attempts, row.refusals) == ("retrying", 0, 1)
    waited = (row.retry_at - now).total_seconds()
    expected = 60 if header is None else 7  # no Retry-After: one slot
    assert expected - 1.5 <= waited <= expected + 2.5
    assert rate.last_refusal_status == status
    assert f"HTTP {status}" in row.error


def test_retry_after_is_read_as_seconds_or_an_http_date_and_bounded():
    now = at("2026-01-05 09:00")
    assert retry_after_seconds("120", now) == 120.0
    assert retry_after_seconds(" 3 ", now) == 3.0
    assert retry_after_seconds("Mon, 05 Jan 2026 09:00:30 GMT", now) == 30.0
    assert retry_after_seconds("Mon, 05 Jan 2026 08:00:00 GMT", now) == 0.0  # gone by
    for bad in (None, "", "soon", "-5", "1.5e3", "Mon, 99 Jan 2026"):
        assert retry_after_seconds(bad, now) is None
    assert refusal_wait(None, 60) == 60.0
    assert refusal_wait(float("nan"), 2) == 2.0
    assert refusal_wait(10**9, 60) == 3600.0
    assert refusal_wait(0.0, 60) == 0.0


def test_a_re_plan_lost_with_redis_is_queued_again_by_reconcile(refusing):
    plan_stored_task(submit([1, 2], limit="partner"), now=PAST)
    run_slot("partner", FIRST_SLOT)
    [event] = events()
    get_redis().flushdb()
    assert reconcile()["re-plans queued"] == 1
    assert replan_job_id(event.id) in get_queue(SLOTS_QUEUE).job_ids
    assert reconcile()["re-plans queued"] == 0  # queued already
    replan_limit(limits.find("partner").id, event.id)
    assert reconcile()["re-plans queued"] == 0  # finished


def test_a_downstream_taking_half_the_rate_teaches_it_and_every_id_is_done(make_app):
    """A limiter downstream at 10 calls a second, the limit at 20 a slot of 1 s: the
    refusals lower the learned rate, the IDs refused are planned again without using an
    attempt, and every ID is done."""
    record = Record(rate=10, burst=2)
    with Server(record) as url:
        app = make_app(
            ID_PROCESSOR="workers.processors:http_request",
            PROCESSOR_HTTP_URL=url,
            RPM=20,
            SLOT_SECONDS=1,
            WINDOW_SLOTS=5,
            PLAN_LEAD_SECONDS=0.3,
        )
        with app.app_context():
            task_id = submit(range(1, 61), overflow="defer")
            plan_stored_task(task_id)
            _run_until_done(task_id, limits.find("default").id, deadline=time.time() + 60)
            found = rows(task_id)
            rate = learned("default")
            kinds = [event.kind for event in events("default")]
    assert {row.status for row in found.values()} == {"done"}
    assert {row.attempts for row in found.values()} == {1}
    assert record.refused, "the downstream never refused: nothing was learned"
    assert len(record.calls) == 60  # each accepted once; the refused came back
    assert "lowered" in kinds
    assert rate.refusals == len(record.refused)
    assert rate.learned_rpm is not None and rate.learned_rpm < 20


def _run_until_done(task_id: int, limit_id: int, deadline: float) -> None:
    """What the workers would do, in turn: the next slot holding pending IDs, then the
    re-plans and the retries its outcomes asked for."""
    while time.time() < deadline:
        waiting = dispatch_store.slots_with_pending_ids(limit_id, datetime.now(UTC) + HOUR)
        db.session.commit()
        if waiting:
            run_slot("default", waiting[0])
        for limit, event in limits.unfinished_replans():
            replan_limit(limit, event)
        plan_retries()
        if db.session.get(IdTask, task_id, populate_existing=True).status == "done":
            return
        time.sleep(0.05)
    raise AssertionError("the task did not finish in time")


def test_what_was_accepted_is_judged_over_a_slots_length_at_least():
    ends = [100.0 + k * 0.1 for k in range(10)]  # 10 calls done in the last second
    # A second of a 2-s slot seen: 10 in it, 20 over a whole slot at that pace.
    assert seen_accepting(ends, 101.0, 100.0, 2) == 20.0
    assert seen_accepting(ends, 100.5, 100.0, 2) is None  # too soon to tell
    # Three slots seen: only the calls of the last slot's length count.
    assert seen_accepting(ends, 102.55, 96.0, 2) == 4.0
    assert lowered(40, None) == 28 and lowered(40, 24.6) == 24 and lowered(1, 0.0) == 1
    assert lowered(40, 5.0) == 20  # never below half in one step
    assert raised(20, 40) == 24 and raised(39, 40) == 40 and raised(3, 4) == 4
