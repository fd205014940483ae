"""The HTTP processor against a local server standing in for the downstream."""

import asyncio
import time
from datetime import timedelta

import psycopg
import pytest
from sqlalchemy import text

from service.core.config import Config
from service.core.extensions import db
from service.dispatch.claims import deployment_id
from service.dispatch.pacing import Clock
from service.dispatch.slot_runs import claim_life, run_slot
from service.limits.store import DEFAULT
from service.planning.retries import plan_retries
from service.planning.windows import plan_stored_task
from service.processors.builtin import http_request, record_user

from ..downstream import Record, Server
from ..helpers import at, submit

PAST = at("2026-01-05 08:59:50")


@pytest.fixture
def downstream():
    record = Record(answers={2: 429, 3: 503, 5: 404}, slow_ids={4: 1.0})  # 4 answers too late
    with Server(record) as url:
        yield record, url


def http_app(make_app, url, **settings):
    return make_app(
        ID_PROCESSOR="workers.processors:http_request", PROCESSOR_HTTP_URL=url, **settings
    )


def test_each_id_is_one_request_and_its_answer_decides_the_outcome(make_app, downstream):
    record, url = downstream
    app = http_app(
        make_app, url, PROCESSOR_HTTP_TIMEOUT=0.3, PACING=False, RETRY_BACKOFF_SECONDS=3600
    )
    with app.app_context():
        task_id = submit([1, 2, 3, 4, 5])
        plan_stored_task(task_id, now=PAST)
        run_slot(DEFAULT, at("2026-01-05 09:00"))
        rows = db.session.execute(
            text("SELECT user_id, status, attempts, error FROM assignments ORDER BY user_id")
        ).all()
        deployment = deployment_id()
    outcome = {row.user_id: (row.status, row.attempts) for row in rows}
    assert outcome == {
        1: ("done", 1),
        2: ("retrying", 0),  # 429 and 503 refuse for now: no attempt used
        3: ("retrying", 0),
        4: ("retrying", 1),
        5: ("failed", 1),
    }
    errors = {row.user_id: row.error for row in rows}
    assert "HTTP 429" in errors[2] and "HTTP 503" in errors[3] and "HTTP 404" in errors[5]
    assert "timed out" in errors[4]
    assert record.keys() == {u: [f"{deployment}-{task_id}-{u - 1}"] for u in range(1, 6)}


def test_a_retried_call_carries_the_same_idempotency_key(make_app, downstream):
    record, url = downstream
    app = http_app(
        make_app,
        url,
        PACING=False,
        RETRY_BACKOFF_SECONDS=0,
        SLOT_SECONDS=1,
        WINDOW_SLOTS=5,
        PLAN_LEAD_SECONDS=0.2,
    )
    with app.app_context():
        task_id = submit([7, 2])  # 2 answers 429 every time
        plan_stored_task(task_id, now=PAST)
        run_slot(DEFAULT, at("2026-01-05 08:59:51"))
        assert plan_retries() == 1
        retry_slot = db.session.execute(
            text("SELECT slot_start FROM assignments WHERE user_id = 2")
        ).scalar()
        run_slot(DEFAULT, retry_slot)
        key = f"{deployment_id()}-{task_id}"
    assert record.keys() == {7: [f"{key}-0"], 2: [f"{key}-1"] * 2}


def test_keys_are_unique_to_the_deployment(make_app, downstream):
    """A rebuilt database (or a second deployment) makes a new deployment id: the same
    task and position never send a key that was sent before."""
    record, url = downstream
    app = http_app(make_app, url, PACING=False)
    with app.app_context():
        first = deployment_id()
        task_id = submit([1])
        plan_stored_task(task_id, now=PAST)
        run_slot(DEFAULT, at("2026-01-05 09:00"))
        # Rebuilt: the same task id and position come again.
        db.session.execute(
            text("TRUNCATE assignments, id_tasks, slots, deployment RESTART IDENTITY CASCADE")
        )
        db.session.commit()
        again = submit([1])
        plan_stored_task(again, now=PAST)
        run_slot(DEFAULT, at("2026-01-05 09:00"))
        second = deployment_id()
    assert again == task_id
    assert first != second and len(first) == len(second) == 36
    assert record.keys()[1] == [f"{first}-{task_id}-0", f"{second}-{task_id}-0"]


def test_calls_overlap_on_reused_connections_with_the_authorization_header(make_app):
    record = Record(latency=0.2)
    with Server(record) as url:
        app = http_app(
            make_app,
            url,
            PACING=False,
            PROCESSOR_ASYNC_CONCURRENCY=8,
            PROCESSOR_HTTP_AUTHORIZATION="Bearer s3cret",
        )
        with app.app_context():
            plan_stored_task(submit(range(1, 41)), now=PAST)
            run_slot(DEFAULT, at("2026-01-05 09:00"))
            done = db.session.execute(
                text("SELECT count(*) FROM assignments WHERE status = 'done'")
            ).scalar()
    assert done == 40
    assert record.most_in_flight == 8  # 40 calls of 0.2 s overlap, eight at a time
    assert record.connections <= 8  # kept alive and reused, not one per call
    assert {auth for *_, auth in record.calls} == {"Bearer s3cret"}
    settings = Config(
        DATABASE_URL="x",
        REDIS_URL="y",
        PROCESSOR_HTTP_URL=url,
        PROCESSOR_HTTP_AUTHORIZATION="Bearer s3cret",
    )
    assert "s3cret" not in repr(settings)  # what a log line of the settings would show


def test_a_live_worker_calls_no_id_whose_claim_was_taken_over(make_app):
    """Taken over mid-batch (as reconcile takes back a claim that ran out), the IDs not
    yet called are not called by the worker that claimed them: they go back to pending,
    are claimed again, and each is called once."""
    record = Record()
    with Server(record) as url:
        app = http_app(make_app, url, SLOT_SECONDS=1, WINDOW_SLOTS=5, PLAN_LEAD_SECONDS=0.2)
        taken_over = []

        def take_over_after_the_first_calls(seconds: float) -> None:
            if not taken_over:
                time.sleep(0.3)  # the calls handed out so far reach the downstream
                called = sorted({user_id for _, user_id, _, _ in record.calls})
                with psycopg.connect(app.config["DATABASE_URL"], autocommit=True) as other:
                    taken_over.append(
                        other.execute(
                            "UPDATE assignments SET status = 'pending', claimed_at = NULL, "
                            "claimed_by = NULL, claimed_until = NULL "
                            "WHERE status = 'running' AND user_id <> ALL(%s)",
                            (called,),
                        ).rowcount
                    )
            time.sleep(seconds)

        with app.app_context():
            task_id = submit([1, 2, 3, 4])
            plan_stored_task(task_id, now=PAST)
            clock = Clock(sleep=take_over_after_the_first_calls)
            run = run_slot(DEFAULT, at("2026-01-05 08:59:51"), clock=clock)
            statuses = db.session.execute(text("SELECT status FROM assignments")).scalars()
            assert set(statuses) == {"done"}
    assert 1 <= taken_over[0] <= 3
    assert run.claimed == 4 + taken_over[0]  # the ones taken over were claimed again
    assert {user_id: len(keys) for user_id, keys in record.keys().items()} == {
        1: 1,
        2: 1,
        3: 1,
        4: 1,
    }


def test_a_claim_outlives_the_longest_call_of_its_processor(app):
    with app.app_context():
        assert claim_life(record_user, {}) == timedelta(seconds=300)
        assert claim_life(http_request, {"timeout": 1.0}) == timedelta(seconds=300)
        # Four phases of 100 s each, the claim taken a second ahead, and a margin.
        assert claim_life(http_request, {"timeout": 100.0}) == timedelta(seconds=406)


def test_a_stored_error_names_the_url_without_its_query(make_app):
    record = Record(answers={5: 404})
    with Server(record) as url:
        app = http_app(make_app, url + "?token=s3cret&x=1", PACING=False, MAX_ATTEMPTS=1)
        with app.app_context():
            task_id = submit([5])
            plan_stored_task(task_id, now=PAST)
            run_slot(DEFAULT, at("2026-01-05 09:00"))
            error = db.session.execute(
                text("SELECT error FROM assignments WHERE task_id = :t"), {"t": task_id}
            ).scalar()
    assert "calling http://127.0.0.1:" in error or "from http://127.0.0.1:" in error
    assert "/users/5" in error
    assert "s3cret" not in error and "?" not in error


def test_the_pooled_client_is_made_before_the_slots_first_turn(make_app, downstream):
    """Made by the first calls, it would hold them up together and let them go as one
    burst, which a strict limiter refuses."""
    from service.processors import builtin

    _, url = downstream
    app = http_app(make_app, url, PROCESSOR_HTTP_TIMEOUT=7.5)
    builtin._clients.clear()

    async def prepared_then_closed():
        await builtin.http_request.prepare({"url": url, "timeout": 7.5})
        made = [key[2:] for key in builtin._clients]
        await builtin.http_request.close({})
        return made

    with app.app_context():
        made = asyncio.run(prepared_then_closed())
    assert made == [(7.5, "127.0.0.1")]
    assert builtin._clients == {}  # the loop's sessions end with it
