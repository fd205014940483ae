"""Domain errors become HTTP answers in one place; of the database's integrity errors,
only a duplicate is the client's (409), any other is a bug: logged, and a 500."""

import logging

import pytest
from sqlalchemy import text

from service.core import errors as domain
from service.core.extensions import db


@pytest.fixture
def failing_app(make_app):
    """An app with routes that fail on purpose, answering as production does (a bug is
    a 500, not an exception raised into the test)."""
    app = make_app()
    app.config["PROPAGATE_EXCEPTIONS"] = False

    def insert_user(user_id):
        db.session.execute(text("INSERT INTO users (id) VALUES (:id)"), {"id": user_id})
        db.session.commit()
        return {"ok": True}

    raised = {
        "missing": domain.NotFound("task 7 does not exist"),
        "conflict": domain.Conflict("task 7 is running"),
        "refused": domain.Refused("the options are refused", {"options": ["unknown"]}),
        "too-large": domain.TooLarge("a task takes at most 10 IDs"),
        "lookup": LookupError("a bug, not a missing resource"),
    }

    def fail(kind):
        raise raised[kind]

    app.add_url_rule("/test/users/<int:user_id>", "insert_user", insert_user, methods=["POST"])
    app.add_url_rule("/test/users/null", "insert_null", lambda: insert_user(None), methods=["POST"])
    app.add_url_rule("/test/fail/<kind>", "fail", fail)
    return app


@pytest.mark.parametrize(
    ("kind", "status", "message", "errors"),
    [
        ("missing", 404, "task 7 does not exist", None),
        ("conflict", 409, "task 7 is running", None),
        ("refused", 422, "the options are refused", {"options": ["unknown"]}),
        ("too-large", 413, "a task takes at most 10 IDs", None),
    ],
)
def test_each_domain_error_has_its_answer_in_the_one_error_shape(
    failing_app, kind, status, message, errors
):
    answer = failing_app.test_client().get(f"/test/fail/{kind}")
    assert answer.status_code == status
    assert answer.json["code"] == status
    assert answer.json["message"] == message
    assert answer.json.get("errors") == errors


def test_a_lookup_error_outside_the_dashboard_is_a_bug(failing_app):
    answer = failing_app.test_client().get("/test/fail/lookup")
    assert answer.status_code == 500


def test_a_duplicate_is_a_conflict(failing_app):
    client = failing_app.test_client()
    assert client.post("/test/users/5").status_code == 200
    again = client.post("/test/users/5")
    assert again.status_code == 409
    assert again.json["message"] == "a user with this id already exists"


def test_any_other_integrity_error_is_logged_and_answers_500(failing_app, caplog):
    with caplog.at_level(logging.ERROR):
        answer = failing_app.test_client().post("/test/users/null")
    assert answer.status_code == 500
    assert any("not a duplicate" in record.getMessage() for record in caplog.records)
    with failing_app.app_context():
        assert db.session.execute(text("SELECT count(*) FROM users")).scalar() == 0
