"""/healthz and /readyz: open probes; readiness fails fast, saying which check and why."""

import socket
import time

import pytest
from sqlalchemy import text

from service.core.extensions import db
from service.ops.health import migration_heads


@pytest.fixture
def silent_port():
    """A port that takes connections and never answers, as a hung server does."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield server.getsockname()[1]


def test_liveness_answers_ok(client):
    answer = client.get("/healthz")
    assert (answer.status_code, answer.json) == (200, {"status": "ok"})


def test_readiness_passes_every_check_on_a_migrated_database(app, client):
    answer = client.get("/readyz")
    assert answer.status_code == 200
    assert answer.json["status"] == "ok"
    checks = answer.json["checks"]
    assert set(checks) == {"database", "migrations", "redis", "destinations"}
    assert all(check["ok"] for check in checks.values())
    assert checks["destinations"]["detail"] == "no limit held"
    heads = migration_heads(app.extensions["migrate"].directory)
    assert checks["migrations"]["detail"] == f"at head {', '.join(sorted(heads))}"


def test_both_probes_are_open_when_a_token_guards_the_rest(make_app):
    guarded = make_app(API_TOKEN="s3cret-0123456789").test_client()
    assert guarded.get("/healthz").status_code == 200
    assert guarded.get("/readyz").status_code == 200
    assert guarded.get("/users/").status_code == 401


def test_servers_that_hang_make_it_not_ready_within_seconds(make_app, silent_port):
    hung = make_app(
        DATABASE_URL=f"postgresql://postgres@127.0.0.1:{silent_port}/x",
        REDIS_URL=f"redis://127.0.0.1:{silent_port}/0",
    )
    started = time.monotonic()
    answer = hung.test_client().get("/readyz")
    assert time.monotonic() - started < 15  # two 2-s timeouts, and room for a loaded machine
    assert answer.status_code == 503
    assert answer.json["message"] == "not ready: database, migrations, redis"
    failed = answer.json["errors"]
    assert "timeout" in failed["database"].lower()
    assert failed["migrations"] == "not checked: PostgreSQL did not answer"
    assert "Timeout" in failed["redis"]


def test_a_refused_connection_names_only_that_check(make_app):
    answer = make_app(REDIS_URL="redis://127.0.0.1:1/0").test_client().get("/readyz")
    assert answer.status_code == 503
    assert set(answer.json["errors"]) == {"redis"}
    assert "ConnectionError" in answer.json["errors"]["redis"]


def test_a_schema_behind_the_code_is_not_ready(app, client):
    with app.app_context():
        [current] = db.session.execute(text("SELECT version_num FROM alembic_version")).scalars()
        db.session.execute(text("UPDATE alembic_version SET version_num = '0001'"))
        db.session.commit()
        try:
            answer = client.get("/readyz")
        finally:
            db.session.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": current})
            db.session.commit()
    assert answer.status_code == 503
    assert set(answer.json["errors"]) == {"migrations"}
    assert answer.json["errors"]["migrations"] == (
        f"database at 0001, code at {current}: run flask db upgrade"
    )


def test_the_probes_and_their_answers_are_in_the_openapi_document(client):
    paths = client.get("/openapi.json").json["paths"]
    assert set(paths["/healthz"]["get"]["responses"]) >= {"200"}
    assert set(paths["/readyz"]["get"]["responses"]) >= {"200", "503"}
    not_ready = paths["/readyz"]["get"]["responses"]["503"]["content"]["application/json"]
    assert not_ready["schema"]["$ref"].endswith("/NotReady")


def test_a_failed_check_names_no_host_user_or_driver_text(make_app, caplog):
    app = make_app(DATABASE_URL="postgresql://probe_user:pw@127.0.0.1:1/nowhere")
    answer = app.test_client().get("/readyz")
    assert answer.status_code == 503
    detail = answer.json["errors"]["database"]
    assert detail.startswith("OperationalError")
    assert not any(word in detail for word in ("probe_user", "127.0.0.1", "nowhere", "pw"))
    # The operator finds the driver's own words in the log.
    assert any(
        "probe_user" in record.getMessage() or "127.0.0.1" in record.getMessage()
        for record in caplog.records
    )
