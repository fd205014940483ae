"""The HTTP processor against a local server standing in for the downstream."""

import pytest
from sqlalchemy import text

from service.claims import deployment_id
from service.config import Config
from service.dispatch import run_slot
from service.extensions import db
from service.limits import DEFAULT
from service.outcomes import plan_retries
from service.planning import plan_stored_task

from .downstream import Record, Server
from .helpers import at, submit

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
        2: ("retrying", 1),
        3: ("retrying", 1),
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
            PROCESSOR_CONCURRENCY=8,
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
    settings = Config(DATABASE_URL="x", REDIS_URL="y", PROCESSOR_HTTP_AUTHORIZATION="Bearer s3cret")
    assert "s3cret" not in repr(settings)  # what a log line of the settings would show
