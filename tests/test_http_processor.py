"""The HTTP processor against a local server that answers by ID."""

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import text

from service.dispatch import run_slot
from service.extensions import db
from service.planning import plan_stored_task
from service.retries import plan_retries

from .planning_helpers import at, submit

ANSWERS = {1: 200, 2: 429, 3: 503, 5: 404}  # 4 answers too late


class Downstream(BaseHTTPRequestHandler):
    seen: list = []
    keys: dict = {}

    def do_POST(self):
        user_id = int(self.path.rsplit("/", 1)[-1])
        Downstream.seen.append(user_id)
        Downstream.keys.setdefault(user_id, []).append(self.headers["Idempotency-Key"])
        if user_id == 4:
            time.sleep(1.0)
        self.send_response(ANSWERS.get(user_id, 200))
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def downstream():
    Downstream.seen = []
    Downstream.keys = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), Downstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_each_id_is_one_request_and_its_answer_decides_the_outcome(make_app, downstream):
    app = make_app(
        ID_PROCESSOR="workers.processors:http_request",
        PROCESSOR_HTTP_URL=downstream + "/u/{id}",
        PROCESSOR_HTTP_TIMEOUT=0.3,
        PACING=False,
        MAX_ATTEMPTS=2,
        RETRY_BACKOFF_SECONDS=3600,
    )
    with app.app_context():
        task_id = submit([1, 2, 3, 4, 5])
        plan_stored_task(task_id, now=at("2026-01-05 08:59:50"))
        run_slot(at("2026-01-05 09:00"))
        rows = db.session.execute(
            text("SELECT user_id, status, attempts, error FROM assignments ORDER BY user_id")
        ).all()
    assert sorted(Downstream.seen) == [1, 2, 3, 4, 5]
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
    assert Downstream.keys == {u: [f"{task_id}-{u - 1}"] for u in range(1, 6)}


def test_a_retried_call_carries_the_same_idempotency_key(make_app, downstream):
    app = make_app(
        ID_PROCESSOR="workers.processors:http_request",
        PROCESSOR_HTTP_URL=downstream + "/u/{id}",
        PACING=False,
        RETRY_BACKOFF_SECONDS=0,
        SLOT_SECONDS=1,
        WINDOW_SLOTS=5,
        PLAN_LEAD_SECONDS=0.2,
    )
    with app.app_context():
        task_id = submit([7, 2])  # 2 answers 429 every time
        plan_stored_task(task_id, now=at("2026-01-05 08:59:50"))
        run_slot(at("2026-01-05 08:59:51"))
        assert plan_retries() == 1
        retry_slot = db.session.execute(
            text("SELECT slot_start FROM assignments WHERE user_id = 2")
        ).scalar()
        run_slot(retry_slot)
    assert Downstream.keys == {7: [f"{task_id}-0"], 2: [f"{task_id}-1"] * 2}
