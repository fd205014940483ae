"""The OpenAPI document as a generated client reads it: the patterns it keeps to, the query
parameters it may send and the names it gives the operations."""

import re
from datetime import UTC, datetime, timedelta

import pytest

from service.web.schemas import TextSubmitQuerySchema

TASKS = "/celery_ids_tasks/"
SUBMISSIONS = (TASKS, f"{TASKS}preview")
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


@pytest.fixture
def client(make_app):
    """A client of an app whose plan horizon (MAX_PLAN_DAYS) reaches past a year, so that a
    start meets the year's bound that the document states, not the horizon."""
    return make_app(MAX_PLAN_DAYS=367).test_client()


def document(client) -> dict:
    return client.get("/openapi.json").json


def query_parameters(spec: dict, path: str) -> list[dict]:
    return [p for p in spec["paths"][path]["post"]["parameters"] if p["in"] == "query"]


def not_before_patterns(spec: dict) -> set[str]:
    """The pattern of every not_before a client may send: in a JSON body, new or partial,
    and in the query of a text body."""
    schemas = spec["components"]["schemas"]
    fields = [
        schemas[name]["properties"]["not_before"] for name in ("TaskSubmit", "TaskSubmitPatch")
    ]
    for path in SUBMISSIONS:
        fields += [p["schema"] for p in query_parameters(spec, path) if p["name"] == "not_before"]
    assert len(fields) == 4
    return {field["pattern"] for field in fields}


def keeps_to(patterns: set[str], moment: str) -> bool:
    return all(re.search(pattern, moment) for pattern in patterns)


def submitted(client, not_before: str) -> tuple[int, int]:
    """The answers to the same start in a JSON body and in a text body's query."""
    body = client.post(TASKS, json={"task_name": "t", "ids": [1], "not_before": not_before})
    query = client.post(
        TASKS, query_string={"not_before": not_before}, data="1", content_type="text/csv"
    )
    return body.status_code, query.status_code


def next_january() -> str:
    # Its first moment is never more than 366 days ahead, whatever the day it is now.
    return f"{datetime.now(UTC).year + 1}-01-01T00:00:00Z"


def test_a_start_next_january_keeps_to_the_document(client):
    spec = document(client)
    assert submitted(client, next_january()) == (202, 202)
    assert keeps_to(not_before_patterns(spec), next_january())
    description = spec["components"]["schemas"]["TaskSubmit"]["properties"]["not_before"]
    assert "at most a year ahead" in description["description"]


def accepted_starts() -> list[str]:
    now = datetime.now(UTC)
    return [
        "1970-01-01T00:00:00Z",
        "2000-02-29T12:00:00+05:30",
        now.isoformat(),
        (now + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S-11:00"),
        (now + timedelta(days=200)).isoformat(),
        (now + timedelta(days=365)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        (now + timedelta(days=366) - timedelta(minutes=1)).isoformat(),
        next_january(),
    ]


def test_every_start_the_server_accepts_keeps_to_the_document(client):
    patterns = not_before_patterns(document(client))
    for start in accepted_starts():
        assert submitted(client, start) == (202, 202), start
        assert keeps_to(patterns, start), start


@pytest.mark.parametrize(
    "start", ["1969-12-31T23:59:59Z", "0001-01-01T00:00:00+14:00", "9001-01-01T00:00:00Z"]
)
def test_a_year_the_server_refuses_is_outside_the_pattern(client, start):
    assert submitted(client, start) == (422, 422)
    assert not any(re.search(pattern, start) for pattern in not_before_patterns(document(client)))


# What a query parameter's schema shares with the same field of a JSON body.
RULES = ("type", "format", "pattern", "enum", "minLength", "maxLength")


@pytest.mark.parametrize("path", SUBMISSIONS)
def test_a_text_body_documents_every_field_of_its_query_once(client, path):
    spec = document(client)
    names = [parameter["name"] for parameter in query_parameters(spec, path)]
    fields = [field.data_key or name for name, field in TextSubmitQuerySchema().fields.items()]
    assert sorted(names) == sorted(fields)
    assert "limit" in names
    json_fields = spec["components"]["schemas"]["TaskSubmit"]["properties"]
    for parameter in query_parameters(spec, path):
        assert parameter["description"].startswith("with a text body"), parameter
        # A header line is a text body's own: a JSON body has no field of that name.
        same = json_fields.get(parameter["name"], TEXT_ONLY.get(parameter["name"]))
        assert {rule: parameter["schema"].get(rule) for rule in RULES} == {
            rule: same.get(rule) for rule in RULES
        }


# The query parameters of a text body that no JSON field shares, as documented.
TEXT_ONLY = {"header": {"type": "boolean"}}


@pytest.mark.parametrize(("path", "answer"), [(TASKS, "TaskAccepted"), (SUBMISSIONS[1], "Preview")])
def test_a_skipped_header_is_documented_in_the_query_and_the_answer(client, path, answer):
    spec = document(client)
    (header,) = [p for p in query_parameters(spec, path) if p["name"] == "header"]
    assert (header["schema"]["type"], header["schema"]["default"]) == ("boolean", False)
    assert "first line" in header["description"]
    skipped = spec["components"]["schemas"][answer]["properties"]["header_skipped"]
    assert (skipped["type"], skipped["nullable"]) == ("string", True)


@pytest.mark.parametrize(
    ("body", "kept_to"),
    [
        ("1,2\n3", True),
        ("user_id\n1\n2", True),
        ("\ufeffuser_id\r\n1\r\n2\r\n", True),
        ("user_id\n", False),
        ("user1\n1", False),
        ("user_id\nname\n1", False),
        ("1\n5a", False),
    ],
)
def test_the_text_body_pattern_admits_a_header_line_without_digits(client, body, kept_to):
    spec = document(client)
    content = spec["paths"][TASKS]["post"]["requestBody"]["content"]
    for media_type in ("text/csv", "text/plain"):
        pattern = content[media_type]["schema"]["pattern"]
        assert (re.search(pattern, body) is not None) == kept_to, (media_type, body)
        answer = client.post(TASKS, data=body.encode(), content_type=media_type)
        assert (answer.status_code == 202) == kept_to, answer.json


def test_the_error_answer_documents_its_fields(client):
    error = document(client)["components"]["schemas"]["Error"]["properties"]
    assert set(error) == {"code", "status", "message", "errors"}
    assert "by the field the client sent" in error["errors"]["description"]
    assert "`line` and `column`" in error["errors"]["description"]


def test_a_text_body_documents_the_limit_it_is_planned_under(client):
    (limit,) = [p for p in query_parameters(document(client), TASKS) if p["name"] == "limit"]
    assert limit["schema"]["type"] == "string"
    assert re.search(limit["schema"]["pattern"], "partner-api")
    assert "limit it is planned under" in limit["description"]


OPERATIONS = {
    "get_root": ("get", "/"),
    "list_users": ("get", "/users/"),
    "create_user": ("post", "/users/"),
    "get_user": ("get", "/users/{user_id}/"),
    "replace_user": ("put", "/users/{user_id}/"),
    "update_user": ("patch", "/users/{user_id}/"),
    "delete_user": ("delete", "/users/{user_id}/"),
    "list_tasks": ("get", "/celery_ids_tasks/"),
    "submit_task": ("post", "/celery_ids_tasks/"),
    "preview_task": ("post", "/celery_ids_tasks/preview"),
    "get_task": ("get", "/celery_ids_tasks/{task_id}/"),
    "replace_task": ("put", "/celery_ids_tasks/{task_id}/"),
    "update_task": ("patch", "/celery_ids_tasks/{task_id}/"),
    "cancel_task": ("delete", "/celery_ids_tasks/{task_id}/"),
    "list_task_ids": ("get", "/celery_ids_tasks/{task_id}/ids/"),
    "get_plan": ("get", "/slots/"),
    "list_limits": ("get", "/limits/"),
    "create_limit": ("post", "/limits/"),
    "get_limit": ("get", "/limits/{limit_name}/"),
    "replace_limit": ("put", "/limits/{limit_name}/"),
    "update_limit": ("patch", "/limits/{limit_name}/"),
    "delete_limit": ("delete", "/limits/{limit_name}/"),
    "list_limit_events": ("get", "/limits/{limit_name}/events/"),
    "check_liveness": ("get", "/healthz"),
    "check_readiness": ("get", "/readyz"),
    "get_metrics": ("get", "/metrics"),
}


def operation_ids(spec: dict) -> dict[tuple[str, str], str | None]:
    """Each operation's id by its method and path."""
    return {
        (method, path): operation.get("operationId")
        for path, operations in spec["paths"].items()
        for method, operation in operations.items()
        if method in METHODS
    }


def test_every_operation_has_a_unique_snake_case_operation_id(client):
    ids = list(operation_ids(document(client)).values())
    assert None not in ids
    assert len(set(ids)) == len(ids)
    assert [i for i in ids if not re.fullmatch(r"[a-z]+(_[a-z]+)*", i)] == []


def test_each_operation_id_names_what_its_operation_does(client):
    named = {place: operation_id for operation_id, place in OPERATIONS.items()}
    assert operation_ids(document(client)) == named
