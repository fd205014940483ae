"""Idempotency-Key on POST /celery_ids_tasks/ and POST /users/: a request sent again gets
the first answer and does nothing; the key for another request is refused."""

import threading

import pytest
from rq import Queue
from sqlalchemy import text

from service.core import locks
from service.core.extensions import db, get_redis
from service.core.models import User
from service.jobs import PLANNING_QUEUE
from service.web.idempotency import delete_expired, idempotent

from ..processes import wait_until

TASKS = "/celery_ids_tasks/"
KEY = {"Idempotency-Key": "4b1d-8e03"}
TASK = {"task_name": "newsletter", "ids": [1, 2, 3]}


def count(app, table: str) -> int:
    with app.app_context():
        return db.session.execute(text(f"SELECT count(*) FROM {table}")).scalar()


def stored_keys(app) -> dict[str, int | None]:
    with app.app_context():
        rows = db.session.execute(text("SELECT key, status_code FROM idempotency_keys"))
        return dict(rows.all())


def test_a_json_task_sent_again_gets_the_first_answer_and_is_stored_once(app, client):
    first = client.post(TASKS, json=TASK, headers=KEY)
    again = client.post(TASKS, json=TASK, headers=KEY)
    assert (first.status_code, again.status_code) == (202, 202)
    assert again.json == first.json
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert again.mimetype == "application/json"
    assert count(app, "id_tasks") == 1
    with app.app_context():
        assert Queue(PLANNING_QUEUE, connection=get_redis()).count == 1


def test_a_text_body_sent_again_is_replayed_and_another_body_is_refused(app, client):
    def post(query, body):
        return client.post(f"{TASKS}?{query}", data=body, content_type="text/csv", headers=KEY)

    first = post("task_name=import", "1,2\n3")
    assert first.status_code == 202
    assert post("task_name=import", "1,2\n3").json["task_id"] == first.json["task_id"]
    for query, body in (("task_name=import", "1,2\n4"), ("task_name=other", "1,2\n3")):
        refused = post(query, body)
        assert refused.status_code == 422
        assert "used for another request" in refused.json["message"]
    assert count(app, "id_tasks") == 1


def test_a_text_body_over_the_json_limit_is_hashed_under_its_own_limit(make_app):
    app = make_app(MAX_CONTENT_LENGTH=64)
    client = app.test_client()
    body = ",".join(str(i) for i in range(1, 200))
    answers = [
        client.post(f"{TASKS}?task_name=t", data=body, content_type="text/plain", headers=KEY)
        for _ in range(2)
    ]
    assert [answer.status_code for answer in answers] == [202, 202]
    assert answers[1].json["total"] == 199
    assert answers[1].headers["Idempotent-Replayed"] == "true"


def test_a_user_sent_again_is_created_once_and_its_key_is_refused_elsewhere(app, client):
    first = client.post("/users/", json={"name": "Ada"}, headers=KEY)
    again = client.post("/users/", json={"name": "Ada"}, headers=KEY)
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.json == first.json
    assert count(app, "users") == 1
    elsewhere = client.post(TASKS, json=TASK, headers=KEY)
    assert elsewhere.status_code == 422
    assert elsewhere.json["message"].startswith("this Idempotency-Key was used for another")
    assert count(app, "id_tasks") == 0


def test_without_a_key_every_request_is_carried_out(app, client):
    client.post("/users/", json={"name": "Ada"})
    client.post("/users/", json={"name": "Ada"})
    assert count(app, "users") == 2
    assert stored_keys(app) == {}


def test_a_refused_request_keeps_no_key_and_may_be_corrected(app, client):
    refused = client.post(TASKS, json={"task_name": "t", "ids": []}, headers=KEY)
    assert refused.status_code == 422
    assert stored_keys(app) == {}
    assert client.post(TASKS, json=TASK, headers=KEY).status_code == 202
    assert stored_keys(app) == {KEY["Idempotency-Key"]: 202}


def test_a_request_that_fails_keeps_no_key_nor_anything_it_wrote(app, client):
    def failing_view():
        db.session.add(User(id=5, name="half-made"))
        db.session.flush()
        raise RuntimeError("the process failed half way")

    request = app.test_request_context("/users/", method="POST", json={"id": 5}, headers=KEY)
    with request, pytest.raises(RuntimeError):
        idempotent(failing_view)()
    assert (count(app, "users"), stored_keys(app)) == (0, {})
    assert client.post("/users/", json={"id": 5, "name": "Ada"}, headers=KEY).status_code == 201


def test_a_key_whose_answer_was_lost_is_a_conflict(app, client):
    # What a process that died between its request's commit and recording the answer left.
    with app.app_context():
        db.session.execute(text("INSERT INTO idempotency_keys (key) VALUES (:k)"), {"k": "lost"})
        db.session.commit()
    answer = client.post(TASKS, json=TASK, headers={"Idempotency-Key": "lost"})
    assert answer.status_code == 409
    assert "answer was lost" in answer.json["message"]
    assert count(app, "id_tasks") == 0


@pytest.mark.parametrize("key", ["", "k" * 256, "tab\there", "caf\xe9", "del\x7f"])
def test_a_malformed_key_is_a_400_and_stores_nothing(app, client, key):
    answer = client.post(TASKS, json=TASK, headers={"Idempotency-Key": key})
    assert answer.status_code == 400
    assert answer.json["message"] == "Idempotency-Key must be 1 to 255 printable ASCII characters"
    assert count(app, "id_tasks") == 0


def test_the_longest_key_is_taken(client):
    headers = {"Idempotency-Key": "~" * 255}
    assert client.post(TASKS, json=TASK, headers=headers).status_code == 202
    assert client.post(TASKS, json=TASK, headers=headers).headers["Idempotent-Replayed"] == "true"


def _waiting_locks(app) -> list[str]:
    """Locks that requests of this test database wait for: the key's, and tables'."""
    with app.app_context():
        return (
            db.session.execute(
                text(
                    "SELECT locktype FROM pg_locks WHERE NOT granted "
                    "AND (locktype <> 'advisory' OR classid = :namespace) "
                    "AND database = (SELECT oid FROM pg_database "
                    "                WHERE datname = current_database()) "
                    "ORDER BY locktype"
                ),
                {"namespace": locks.IDEMPOTENCY_KEY},
            )
            .scalars()
            .all()
        )


def test_two_concurrent_requests_with_one_key_create_one_task(app):
    barrier = threading.Barrier(2)
    answers = []

    def post():
        barrier.wait(timeout=30)
        answers.append(app.test_client().post(TASKS, json=TASK, headers=KEY))

    threads = [threading.Thread(target=post) for _ in range(2)]
    with app.app_context():
        blocker = db.engine.connect()
    try:
        # The request that takes the key first stops at writing its task, so the other
        # is seen waiting for the key while the first is under way.
        blocker.execute(text("LOCK TABLE id_tasks IN EXCLUSIVE MODE"))
        for thread in threads:
            thread.start()
        with app.app_context():
            wait_until(lambda: _waiting_locks(app) == ["advisory", "relation"], 60, "both requests")
    finally:
        blocker.rollback()
        blocker.close()
    for thread in threads:
        thread.join(60)
    assert sorted(answer.status_code for answer in answers) == [202, 202]
    assert answers[0].json == answers[1].json
    assert sorted(answer.headers.get("Idempotent-Replayed", "") for answer in answers) == [
        "",
        "true",
    ]
    assert count(app, "id_tasks") == 1


def test_keys_older_than_their_hours_are_deleted_and_may_be_used_again(app, client, runner):
    for key in ("old", "recent"):
        client.post("/users/", json={"name": key}, headers={"Idempotency-Key": key})
    with app.app_context():
        db.session.execute(
            text(
                "UPDATE idempotency_keys SET created_at = now() - CASE key "
                "WHEN 'old' THEN interval '24 hours 1 second' ELSE interval '23 hours' END"
            )
        )
        db.session.commit()
    # The scheduler deletes them at its start, and every RECONCILE_INTERVAL_SECONDS.
    assert runner.invoke(args=["scheduler", "--burst"]).exit_code == 0
    assert set(stored_keys(app)) == {"recent"}
    reused = client.post(TASKS, json=TASK, headers={"Idempotency-Key": "old"})
    assert reused.status_code == 202
    assert "Idempotent-Replayed" not in reused.headers


def test_the_hours_a_key_lives_are_a_setting(make_app):
    app = make_app(IDEMPOTENCY_KEY_HOURS=1)
    client = app.test_client()
    client.post("/users/", json={"name": "a"}, headers=KEY)
    with app.app_context():
        db.session.execute(text("UPDATE idempotency_keys SET created_at = now() - interval '61m'"))
        db.session.commit()
        assert delete_expired() == 1
    assert stored_keys(app) == {}


def test_the_header_and_its_answers_are_in_the_openapi_document(client):
    paths = client.get("/openapi.json").json["paths"]
    for path, status in (("/celery_ids_tasks/", "202"), ("/users/", "201")):
        post = paths[path]["post"]
        (header,) = [p for p in post["parameters"] if p["in"] == "header"]
        assert header["name"] == "Idempotency-Key"
        assert header["schema"]["maxLength"] == 255
        assert {"400", "409", "422"} <= set(post["responses"])
        assert "Idempotent-Replayed" in post["responses"][status]["headers"]
