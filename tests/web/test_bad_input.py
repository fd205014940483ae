"""Bad input: a 4xx that says what and where, and nothing stored."""

import pytest

from ..helpers import snapshot

TASKS = "/celery_ids_tasks/"

CASES = {
    "not an integer": (TASKS, {"json": {"task_name": "t", "payload": "1,two,3"}}, 422, '"two"'),
    "zero": (TASKS, {"json": {"task_name": "t", "ids": [1, 0]}}, 422, "less than 1"),
    "negative": (TASKS, {"json": {"task_name": "t", "ids": [-5]}}, 422, "less than 1"),
    "beyond 64 bits": (TASKS, {"json": {"task_name": "t", "ids": [2**63]}}, 422, "beyond 64 bits"),
    "numeric string in ids": (
        TASKS,
        {"json": {"task_name": "t", "ids": [1, "2"]}},
        422,
        "a string",
    ),
    "float": (TASKS, {"json": {"task_name": "t", "ids": [1.5]}}, 422, "decimal point"),
    "float without fraction": (
        TASKS,
        {"json": {"task_name": "t", "ids": [2.0]}},
        422,
        "decimal point",
    ),
    "empty list": (TASKS, {"json": {"task_name": "t", "ids": []}}, 422, "empty"),
    "empty payload": (TASKS, {"json": {"task_name": "t", "payload": " , "}}, 422, "empty"),
    "ids not a list": (TASKS, {"json": {"task_name": "t", "ids": "1,2"}}, 422, "list"),
    "both forms": (
        TASKS,
        {"json": {"task_name": "t", "ids": [1], "payload": "1"}},
        422,
        "not both",
    ),
    "no ids at all": (TASKS, {"json": {"task_name": "t"}}, 422, "payload or as ids"),
    "no task name": (TASKS, {"json": {"ids": [1]}}, 422, "task_name"),
    "unknown field": (
        TASKS,
        {"json": {"task_name": "t", "ids": [1], "x": 1}},
        422,
        "Unknown field",
    ),
    "unknown overflow": (
        TASKS,
        {"json": {"task_name": "t", "ids": [1], "overflow": "burst"}},
        422,
        "overflow",
    ),
    "malformed json": (
        TASKS,
        {"data": '{"task_name": ', "content_type": "application/json"},
        400,
        "Invalid JSON",
    ),
    "json too deep": (
        TASKS,
        {"data": "[" * 50000, "content_type": "application/json"},
        400,
        "nested too deeply",
    ),
    "json integer of 5000 digits": (
        TASKS,
        {"data": '{"ids": [' + "9" * 5000 + "]}", "content_type": "application/json"},
        400,
        "digits",
    ),
    "json that is not an object": (TASKS, {"json": [1, 2, 3]}, 422, "Invalid input type"),
    "wrong content type": (
        TASKS,
        {"data": "task_name=t", "content_type": "application/x-www-form-urlencoded"},
        415,
        "Content-Type must be",
    ),
    "no content type": (TASKS, {"data": "{}"}, 415, "Content-Type must be"),
    "invalid utf-8": (
        TASKS,
        {"data": b'{"task_name": "\xff"}', "content_type": "application/json"},
        400,
        "Invalid JSON",
    ),
    "user id a boolean": ("/users/", {"json": {"name": "n", "id": True}}, 422, "boolean"),
    "user name too long": ("/users/", {"json": {"name": "n" * 256}}, 422, "name"),
    "user name null": ("/users/", {"json": {"name": None}}, 422, "name"),
    "user name with a NUL": ("/users/", {"json": {"name": "a\x00b"}}, 422, "NUL"),
    "task name with a lone surrogate": (
        TASKS,
        {"data": '{"task_name": "\\ud800", "ids": [1]}', "content_type": "application/json"},
        422,
        "lone surrogate",
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input_is_refused_and_stores_nothing(app, client, case):
    path, request, status, clue = CASES[case]
    before = snapshot(app)
    answer = client.post(path, **request)
    assert answer.status_code == status, answer.json
    assert answer.json["code"] == status
    assert clue in answer.get_data(as_text=True)
    assert snapshot(app) == before
    assert answer.json["message"] not in GENERIC_MESSAGES


# What flask-smorest and werkzeug would say of any request of the status: nothing of it.
GENERIC_MESSAGES = {
    "The request was well-formed but was unable to be followed due to semantic errors.",
    "The browser (or proxy) sent a request that this server could not understand.",
}


def test_a_missing_field_is_named_in_the_message_and_in_errors(client):
    answer = client.post(TASKS, json={"ids": [1]})
    assert answer.json == {
        "code": 422,
        "status": "Unprocessable Entity",
        "message": "task_name: Missing data for required field.",
        "errors": {"task_name": ["Missing data for required field."]},
    }


def test_errors_are_keyed_by_field_whether_in_the_body_or_the_query(client):
    in_json = client.post(TASKS, json={"task_name": "t", "ids": [1], "overflow": "burst"})
    in_query = client.post(f"{TASKS}?overflow=burst", data="1", content_type="text/csv")
    assert in_json.status_code == in_query.status_code == 422
    assert list(in_json.json["errors"]) == list(in_query.json["errors"]) == ["overflow"]
    assert in_json.json["errors"] == in_query.json["errors"]
    assert in_json.json["message"] == in_query.json["message"]
    assert in_json.json["message"].startswith("overflow: Must be one of")


def test_a_page_out_of_range_is_keyed_by_its_field(client):
    answer = client.get("/users/?page=0")
    assert answer.status_code == 422
    assert list(answer.json["errors"]) == ["page"]
    assert answer.json["message"] == "page: Must be greater than or equal to 1."


def test_bad_ids_in_json_are_counted_and_named_by_index(client):
    ids = [1, -5, "2", True, 1.5, 2**63, None, 3]
    answer = client.post(TASKS, json={"task_name": "t", "ids": ids})
    assert answer.status_code == 422
    assert answer.json["message"] == "6 of the 8 IDs are invalid: see errors.ids"
    details = answer.json["errors"]["ids"]
    assert (details["invalid"], details["submitted"]) == (6, 8)
    assert [(bad["index"], bad["token"]) for bad in details["listed"]] == [
        (1, "-5"),
        (2, '"2"'),
        (3, "true"),
        (4, "1.5"),
        (5, str(2**63)),
        (6, "null"),
    ]


def test_a_whole_body_error_says_what_is_wrong(client):
    answer = client.patch("/celery_ids_tasks/1/", json={})
    assert answer.status_code == 422
    assert answer.json["errors"] == {"_schema": ["give at least one field to change"]}
    assert answer.json["message"] == "give at least one field to change"


def test_a_body_over_the_size_limit_is_413(make_app):
    app = make_app(MAX_CONTENT_LENGTH=1000)
    before = snapshot(app)
    answer = app.test_client().post(TASKS, json={"task_name": "t", "ids": list(range(1, 500))})
    assert answer.status_code == 413
    assert answer.json["status"] == "Request Entity Too Large"
    assert snapshot(app) == before


def test_more_ids_than_a_task_takes_is_413(make_app):
    app = make_app(MAX_IDS_PER_TASK=3)
    before = snapshot(app)
    answer = app.test_client().post(TASKS, json={"task_name": "t", "ids": [1, 2, 3, 4]})
    assert answer.status_code == 413
    assert "at most 3 IDs" in answer.json["message"]
    assert snapshot(app) == before


@pytest.mark.parametrize(
    "path",
    [
        "/users/0/",
        "/users/-1/",
        "/users/99999999999999999999/",
        "/users/abc/",
        "/celery_ids_tasks/1/",
        "/celery_ids_tasks/x/ids/",
        "/nowhere",
        "/rq/7/view",
        "/rq/0/data/job/nonexistent.json",
        "/rq/0/view/job/nonexistent",
    ],
)
def test_missing_resources_are_404(client, path):
    answer = client.get(path)
    assert answer.status_code == 404
    assert answer.json["message"]


@pytest.mark.parametrize(
    "path",
    [
        "/users/?page=0",
        "/users/?page=x",
        "/users/?page_size=1000",
        "/rq/0/data/job/%ff.json",
        "/rq/0/data/jobs/planning/failed/99999999999999999999/asc/1.json",
        "/celery_ids_tasks/1/ids/?slot=0001-01-01T00:00:00%2B14:00",
        "/plan/slots/%ff",
        "/plan/slots/9999-12-31T23:59:59-23:59",
        "/plan/slots/2026-01-05T09:00:00Z?page=100000000000000000000",
    ],
)
def test_odd_values_in_paths_and_queries_are_a_4xx(client, path):
    answer = client.get(path)
    assert 400 <= answer.status_code < 500, answer.get_data(as_text=True)
    if path.startswith("/plan/"):  # a page for people answers its errors as a page
        assert answer.mimetype == "text/html"
        assert str(answer.status_code) in answer.get_data(as_text=True)
    else:
        assert answer.json["code"] == answer.status_code


@pytest.mark.parametrize("page", ["99999999999999999", "100000000000000000000"])
def test_a_page_past_the_end_is_empty(client, page):
    # The second lies beyond what PostgreSQL's OFFSET takes; it is just as empty.
    answer = client.get(f"/users/?page={page}")
    assert (answer.status_code, answer.json) == (200, [])


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("delete", "/users/", {"GET", "POST"}),
        ("post", "/users/1/", {"GET", "PUT", "PATCH", "DELETE"}),
        ("put", "/slots/", {"GET"}),
    ],
)
def test_a_method_not_allowed_is_405_with_the_allowed_ones(client, method, path, allowed):
    answer = getattr(client, method)(path)
    assert answer.status_code == 405
    assert answer.json["message"]
    assert allowed <= {name.strip() for name in answer.headers["Allow"].split(",")}
