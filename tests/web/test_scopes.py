"""Tokens with scopes: what each scope may do, 401 and 403, API_TOKEN as an admin token,
the token's name in the log, its last use, and the scopes in the OpenAPI document."""

import base64
import json
import logging

import pytest
from sqlalchemy import event, text

from service.core.extensions import db
from service.limits.store import DEFAULT_PROCESSOR
from service.web import tokens

from ..helpers import snapshot

API_TOKEN = "s3cret-0123456789"
SCOPES = ("read", "submit", "admin")


def issue(app, name: str, scope: str) -> str:
    with app.app_context():
        return tokens.create(name, scope)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def basic(token: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"ops:{token}".encode()).decode()}


def request_lines(caplog) -> list[dict]:
    return [record.fields for record in caplog.records if record.name == "service.requests"]


# A request of each kind: the scope it needs and its answer once allowed. User 7 exists.
TASK = {"task_name": "t", "ids": [1, 2]}
NEW_LIMIT = {"name": "crm", "rpm": 30, "processor": DEFAULT_PROCESSOR}
REQUESTS = [
    ("get", "/users/", None, "read", 200),
    ("get", "/celery_ids_tasks/", None, "read", 200),
    ("get", "/slots/", None, "read", 200),
    ("get", "/limits/default/", None, "read", 200),
    ("get", "/limits/default/events/", None, "read", 200),
    ("get", "/metrics", None, "read", 200),
    ("get", "/plan", None, "read", 200),
    ("post", "/celery_ids_tasks/preview", TASK, "submit", 200),
    ("post", "/celery_ids_tasks/", TASK, "submit", 202),
    ("patch", "/users/7/", {"name": "renamed"}, "submit", 200),
    ("delete", "/users/7/", None, "submit", 204),
    ("patch", "/limits/default/", {"rpm": 60}, "admin", 200),
    ("post", "/limits/", NEW_LIMIT, "admin", 201),
    ("get", "/rq/", None, "admin", 200),
    ("get", "/rq/requeue/slots", None, "admin", 200),
]


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize(
    ("method", "path", "body", "needed", "allowed"),
    REQUESTS,
    ids=[f"{method} {path}" for method, path, *_ in REQUESTS],
)
def test_each_scope_may_do_what_its_scope_allows_and_no_more(
    app, client, scope, method, path, body, needed, allowed
):
    admin = bearer(issue(app, "the-admin", "admin"))
    probe = bearer(issue(app, "probe", scope))
    assert client.post("/users/", json={"id": 7, "name": "seven"}, headers=admin).status_code == 201
    before = snapshot(app)
    answer = getattr(client, method)(path, json=body, headers=probe)
    if SCOPES.index(scope) >= SCOPES.index(needed):
        assert answer.status_code == allowed, answer.text
        return
    assert answer.status_code == 403
    assert f"needs a token of scope '{needed}'" in answer.json["message"]
    assert f"the token 'probe' has scope '{scope}'" in answer.json["message"]
    assert snapshot(app) == before


def test_without_a_token_or_with_an_unknown_or_revoked_one_the_answer_is_401(app, client):
    token = issue(app, "ci", "read")
    assert client.get("/users/", headers=bearer(token)).status_code == 200
    for headers in ({}, bearer("nope"), bearer(token + "x"), basic("nope")):
        answer = client.get("/users/", headers=headers)
        assert answer.status_code == 401, headers
        assert "API token" in answer.json["message"]
        assert answer.headers["WWW-Authenticate"].startswith("Basic")
    revoked = app.test_cli_runner().invoke(args=["tokens", "revoke", "ci"])
    assert revoked.exit_code == 0, revoked.output
    issue(app, "other", "admin")  # the deployment stays closed
    assert client.get("/users/", headers=bearer(token)).status_code == 401


def test_a_path_that_matches_no_route_needs_a_token_but_no_scope(app, client):
    token = issue(app, "ci", "read")
    assert client.post("/nothing/here").status_code == 401
    assert client.post("/nothing/here", headers=bearer(token)).status_code == 404
    assert client.post("/slots/", headers=bearer(token)).status_code == 405


def test_tokens_stored_close_an_open_deployment_and_it_opens_when_none_is_left(app, client):
    assert client.get("/users/").status_code == 200
    runner = app.test_cli_runner()
    created = runner.invoke(args=["tokens", "create", "ci", "--scope", "read"])
    assert created.exit_code == 0, created.output
    assert client.get("/users/").status_code == 401
    assert client.get("/users/", headers=bearer(created.stdout.strip())).status_code == 200
    assert client.get("/readyz").status_code == 200  # public paths stay public
    assert runner.invoke(args=["tokens", "revoke", "ci"]).exit_code == 0
    assert client.get("/users/").status_code == 200


def test_the_plan_pages_ask_for_the_token_as_pages_and_rq_dashboard_as_json(app, client):
    reader, admin = issue(app, "reader", "read"), issue(app, "ops", "admin")
    page = client.get("/plan")
    assert (page.status_code, page.mimetype) == (401, "text/html")
    assert page.headers["WWW-Authenticate"].startswith("Basic")
    assert client.get("/plan", headers=basic(reader)).status_code == 200
    dashboard = client.get("/rq/")
    assert (dashboard.status_code, dashboard.mimetype) == (401, "application/json")
    assert dashboard.headers["WWW-Authenticate"].startswith("Basic")
    refused = client.get("/rq/", headers=basic(reader))
    assert (refused.status_code, refused.mimetype) == (403, "application/json")
    assert refused.json["message"] == (
        "this request needs a token of scope 'admin'; the token 'reader' has scope 'read'"
    )
    assert client.get("/rq/", headers=basic(admin)).status_code == 200


def test_api_token_is_an_admin_token_beside_the_stored_ones(make_app, caplog):
    guarded = make_app(API_TOKEN=API_TOKEN)
    reader = issue(guarded, "reader", "read")
    client = guarded.test_client()
    caplog.set_level(logging.INFO)
    changed = client.patch("/limits/default/", json={"rpm": 60}, headers=bearer(API_TOKEN))
    assert changed.json["rpm"] == 60
    assert client.get("/rq/", headers=basic(API_TOKEN)).status_code == 200
    assert client.get("/users/", headers=bearer(reader)).status_code == 200
    refused = client.patch("/limits/default/", json={"rpm": 30}, headers=bearer(reader))
    assert refused.status_code == 403
    assert [(line["status"], line["token"]) for line in request_lines(caplog)] == [
        (200, "API_TOKEN"),
        (200, "API_TOKEN"),
        (200, "reader"),
        (403, "reader"),
    ]


def test_the_log_line_names_the_token_and_shows_nothing_of_it(app, client, caplog):
    token = issue(app, "grafana", "read")
    caplog.set_level(logging.INFO)
    client.get("/metrics", headers=bearer(token))
    client.get("/metrics", headers=bearer("not-a-token-at-all"))
    known, unknown = request_lines(caplog)
    assert (known["status"], known["token"]) == (200, "grafana")
    assert unknown["status"] == 401 and "token" not in unknown
    logged = json.dumps([(r.getMessage(), getattr(r, "fields", None)) for r in caplog.records])
    assert token not in logged
    assert tokens.digest(token).hex() not in logged


def last_used(app, name: str):
    with app.app_context():
        return db.session.execute(
            text("SELECT last_used_at FROM api_tokens WHERE name = :n"), {"n": name}
        ).scalar()


def test_the_last_use_is_recorded_at_most_once_a_minute(app, client):
    token = issue(app, "ci", "read")
    assert last_used(app, "ci") is None
    client.get("/users/", headers=bearer(token))
    first = last_used(app, "ci")
    assert first is not None
    client.get("/users/", headers=bearer(token))
    assert last_used(app, "ci") == first
    # As if the first use were two minutes ago: the next one is recorded.
    with app.app_context():
        db.session.execute(
            text("UPDATE api_tokens SET last_used_at = last_used_at - interval '2 minutes'")
        )
        db.session.commit()
    moved_back = last_used(app, "ci")
    client.get("/users/", headers=bearer(token))
    assert last_used(app, "ci") > moved_back


@pytest.fixture
def statements(app):
    """Each statement the app's engine runs, and whether it ran outside a transaction."""
    ran: list[tuple[str, bool]] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        ran.append((statement, cursor.connection.autocommit))

    with app.app_context():
        engine = db.engine
    event.listen(engine, "before_cursor_execute", record)
    yield ran
    event.remove(engine, "before_cursor_execute", record)


def test_a_read_with_a_token_costs_one_lookup_and_runs_without_a_transaction(
    app, client, statements
):
    token = issue(app, "ci", "read")
    client.get("/users/", headers=bearer(token))  # its first use is recorded
    statements.clear()
    assert client.get("/users/", headers=bearer(token)).status_code == 200
    on_tokens = [statement for statement, _ in statements if "api_tokens" in statement]
    assert len(on_tokens) == 1
    assert all(outside for _, outside in statements), statements


# The scope each operation of the document needs; None: public.
OPERATION_SCOPES = {
    "get_root": None,
    "check_liveness": None,
    "check_readiness": None,
    "list_users": "read",
    "get_user": "read",
    "list_tasks": "read",
    "get_task": "read",
    "list_task_ids": "read",
    "get_plan": "read",
    "list_limits": "read",
    "get_limit": "read",
    "list_limit_events": "read",
    "get_metrics": "read",
    "create_user": "submit",
    "replace_user": "submit",
    "update_user": "submit",
    "delete_user": "submit",
    "submit_task": "submit",
    "preview_task": "submit",
    "replace_task": "submit",
    "update_task": "submit",
    "cancel_task": "submit",
    "create_limit": "admin",
    "replace_limit": "admin",
    "update_limit": "admin",
    "delete_limit": "admin",
}
SENTENCES = {
    "read": "Needs a token of scope `read`, `submit` or `admin`.",
    "submit": "Needs a token of scope `submit` or `admin`.",
    "admin": "Needs a token of scope `admin`.",
}


def test_the_openapi_document_states_the_scope_of_each_operation(client):
    spec = client.get("/openapi.json").json
    assert set(spec["components"]["securitySchemes"]) == {"bearerToken", "basicToken"}
    operations = {
        operation["operationId"]: operation
        for methods in spec["paths"].values()
        for operation in methods.values()
        if isinstance(operation, dict) and "operationId" in operation
    }
    assert set(operations) == set(OPERATION_SCOPES)
    for operation_id, scope in OPERATION_SCOPES.items():
        operation = operations[operation_id]
        if scope is None:
            assert operation["security"] == [], operation_id
            assert "x-scope" not in operation, operation_id
            continue
        assert operation["x-scope"] == scope, operation_id
        assert operation["security"] == [{"bearerToken": []}, {"basicToken": []}], operation_id
        assert operation["description"].endswith(SENTENCES[scope]), operation_id
        assert {"401", "403"} <= set(operation["responses"]), operation_id
