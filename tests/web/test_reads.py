"""GETs of the data read outside a transaction; everything else keeps one."""

from contextlib import contextmanager

from sqlalchemy import event, text

from service.core.extensions import db


@contextmanager
def autocommit_of_statements(app):
    """Whether each statement run meanwhile ran outside a transaction."""
    seen = []

    def note(conn, cursor, statement, parameters, context, executemany):
        # The token check looks a token up on a connection of its own, outside any
        # transaction whatever the request (tests/web/test_scopes.py).
        if "api_tokens" not in statement:
            seen.append(conn.connection.driver_connection.autocommit)

    with app.app_context():
        engine = db.engine
    event.listen(engine, "before_cursor_execute", note)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", note)


def test_gets_run_without_begin_and_rollback(app, client):
    task_id = client.post("/celery_ids_tasks/", json={"task_name": "t", "ids": [1]}).json["id"]
    for path in ("/users/", "/celery_ids_tasks/", f"/celery_ids_tasks/{task_id}/", "/slots/"):
        with autocommit_of_statements(app) as seen:
            assert client.get(path).status_code == 200
        assert seen and all(seen), path


def test_writes_keep_their_transaction(app, client):
    with autocommit_of_statements(app) as seen:
        assert client.post("/users/", json={"name": "Ada"}).status_code == 201
    assert seen and not any(seen)


def test_a_context_that_outlives_a_get_gets_a_transaction_again(app, client):
    with app.app_context():
        client.get("/users/")
        db.session.execute(text("INSERT INTO users (id, name) VALUES (5, 'undone')"))
        db.session.rollback()
        assert db.session.execute(text("SELECT count(*) FROM users")).scalar() == 0
