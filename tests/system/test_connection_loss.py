"""Connections that PostgreSQL dropped (a restart, a killed backend) while they sat in the
pool: a request that meets one answers 503 once, never 500, and the next ones succeed."""

import os
from contextlib import ExitStack

import psycopg
from sqlalchemy import text

from service.core.extensions import db

POOLED = 4


def kill_pooled_connections(app) -> int:
    """Fill the pool with POOLED connections, then end their backends as a restart would."""
    with app.app_context(), ExitStack() as held:
        connections = [held.enter_context(db.engine.connect()) for _ in range(POOLED)]
        pids = [conn.execute(text("SELECT pg_backend_pid()")).scalar() for conn in connections]
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as killer:
        ended = killer.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) "
            "FROM unnest(%s::int[]) AS pid",
            [pids],
        ).fetchone()[0]
    assert ended == POOLED
    return ended


def test_reads_after_the_pooled_connections_died(app, client):
    client.post("/users/", json={"name": "Ada"})
    task = client.post("/celery_ids_tasks/", json={"task_name": "t", "ids": [1, 2]}).json
    reads = ["/users/", "/celery_ids_tasks/", f"/celery_ids_tasks/{task['id']}/", "/users/1/"]
    killed = kill_pooled_connections(app)

    answers = [client.get(path) for _ in range(3) for path in reads]

    failed = [answer for answer in answers if answer.status_code != 200]
    assert len(failed) <= killed
    # Once a dead connection is met, the pool drops the others: the rest all succeed.
    codes = [answer.status_code for answer in answers]
    assert codes == [503] * len(failed) + [200] * (len(answers) - len(failed))
    for answer in failed:
        assert answer.headers["Retry-After"] == "1"
        assert "connection to the database was lost" in answer.json["message"]


def test_jobs_and_commands_get_a_live_connection_without_a_failure(app):
    kill_pooled_connections(app)
    with app.app_context():
        assert db.session.execute(text("SELECT 1")).scalar() == 1


def test_a_database_that_cannot_be_reached_is_a_503(make_app):
    unreachable = make_app(DATABASE_URL="postgresql://postgres@127.0.0.1:1/none")
    answer = unreachable.test_client().get("/users/")
    assert answer.status_code == 503
    assert "could not be made" in answer.json["message"]
