"""POSTing IDs as a text body, streamed into PostgreSQL."""

import io

import pytest
from sqlalchemy import text

from service.core.extensions import db
from service.tasks.ids import BELOW_ONE, NOT_A_NUMBER, InvalidIds, stream_ids

from ..processes import ROOT

TASKS = "/celery_ids_tasks/"


def stored_chunks(app) -> int:
    with app.app_context():
        return db.session.execute(text("SELECT count(*) FROM task_id_chunks")).scalar()


def test_csv_body_with_name_and_overflow_in_the_query(client):
    answer = client.post(
        f"{TASKS}?task_name=big&overflow=defer", data="3,1\n2 3\n", content_type="text/csv"
    )
    assert answer.status_code == 202
    task = answer.json
    assert (task["task_name"], task["overflow"], task["payload"]) == ("big", "defer", "3,1,2")
    assert (task["total"], task["duplicates"]) == (3, 1)


def test_the_readmes_example_file_is_accepted(client):
    body = (ROOT / "examples" / "ids.csv").read_bytes()
    answer = client.post(f"{TASKS}?task_name=import", data=body, content_type="text/csv")
    assert answer.status_code == 202
    assert (answer.json["total"], answer.json["duplicates"]) == (300, 0)


def test_a_text_body_without_a_name_gets_a_default_one(client):
    answer = client.post(TASKS, data="4 5", content_type="text/plain")
    assert answer.status_code == 202
    assert answer.json["task_name"] == "text upload"


def test_plain_text_body_of_many_ids(client):
    body = "\n".join(str(i) for i in range(1, 25_001))
    answer = client.post(f"{TASKS}?task_name=many", data=body, content_type="text/plain")
    assert answer.status_code == 202
    assert answer.json["total"] == 25_000
    assert answer.json["payload"] is None
    page = client.get(f"{TASKS}{answer.json['id']}/ids/?page=2001&page_size=10").json
    assert [item["id"] for item in page] == list(range(20_001, 20_011))
    assert page[0]["position"] == 20_000


def test_a_bad_token_is_named_by_line_and_column_and_nothing_is_stored(app, client):
    answer = client.post(f"{TASKS}?task_name=t", data="1,2,x3,4,-5", content_type="text/csv")
    assert answer.status_code == 422
    assert [bad["column"] for bad in answer.json["errors"]["ids"]["listed"]] == [5, 10]
    assert answer.json["errors"]["ids"]["listed"][0]["token"] == "x3"
    assert stored_chunks(app) == 0
    assert client.get(TASKS).json == []


def test_a_bad_id_on_the_second_line_is_named_by_its_line_and_column(client):
    answer = client.post(f"{TASKS}?task_name=t", data="1,2,3\n4,5a,6", content_type="text/csv")
    assert answer.status_code == 422
    assert answer.json == {
        "code": 422,
        "status": "Unprocessable Entity",
        "message": "1 of the 6 IDs is invalid: see errors.ids",
        "errors": {
            "ids": {
                "invalid": 1,
                "submitted": 6,
                "listed": [{"line": 2, "column": 3, "token": "5a", "reason": NOT_A_NUMBER}],
            }
        },
    }


def test_every_bad_id_is_counted_and_the_first_twenty_listed_in_order(client):
    body = "\n".join(f"x{n}" for n in range(20_000))
    answer = client.post(f"{TASKS}?task_name=t", data=body, content_type="text/csv")
    assert answer.status_code == 422
    errors = answer.json["errors"]
    assert list(errors) == ["ids"]
    assert (errors["ids"]["invalid"], errors["ids"]["submitted"]) == (20_000, 20_000)
    assert [(bad["line"], bad["token"]) for bad in errors["ids"]["listed"]] == [
        (n + 1, f"x{n}") for n in range(20)
    ]
    assert answer.json["message"] == (
        "20000 of the 20000 IDs are invalid: the first 20 are listed in errors.ids"
    )


def test_the_same_mistake_reads_the_same_in_json_and_in_csv(client):
    in_json = client.post(TASKS, json={"task_name": "t", "ids": [1, -5]}).json
    in_csv = client.post(f"{TASKS}?task_name=t", data="1\n-5", content_type="text/csv").json
    in_payload = client.post(TASKS, json={"task_name": "t", "payload": "1 -5"}).json
    assert in_json["errors"]["ids"]["listed"] == [{"index": 1, "token": "-5", "reason": BELOW_ONE}]
    assert in_csv["errors"]["ids"]["listed"] == [
        {"line": 2, "column": 1, "token": "-5", "reason": BELOW_ONE}
    ]
    assert in_payload["errors"]["payload"]["listed"] == [
        {"line": 1, "column": 3, "token": "-5", "reason": BELOW_ONE}
    ]
    assert in_json["message"] == in_csv["message"] == "1 of the 2 IDs is invalid: see errors.ids"


def test_a_header_line_without_digits_is_skipped_and_named(client):
    answer = client.post(f"{TASKS}?task_name=t", data="user_id\n1\n2\n", content_type="text/csv")
    assert answer.status_code == 202, answer.json
    assert (answer.json["header_skipped"], answer.json["payload"]) == ("user_id", "1,2")


def test_header_true_skips_any_first_line(client):
    answer = client.post(
        f"{TASKS}?task_name=t&header=true", data="id 2024\n1\n2", content_type="text/csv"
    )
    assert answer.status_code == 202, answer.json
    assert (answer.json["header_skipped"], answer.json["payload"]) == ("id 2024", "1,2")
    preview = client.post(f"{TASKS}preview?header=true", data="7,8\n1\n2", content_type="text/csv")
    assert (preview.status_code, preview.json["header_skipped"]) == (200, "7,8")
    assert preview.json["total"] == 2


def test_without_a_header_nothing_is_skipped(client):
    answer = client.post(f"{TASKS}?task_name=t", data="1\n2", content_type="text/csv")
    assert (answer.json["header_skipped"], answer.json["payload"]) == (None, "1,2")
    assert client.post(TASKS, json={"task_name": "t", "ids": [1]}).json["header_skipped"] is None


def test_a_first_line_of_digits_and_letters_is_refused_as_an_id(client):
    answer = client.post(f"{TASKS}?task_name=t", data="user1\n1\n2", content_type="text/csv")
    assert answer.status_code == 422
    assert answer.json["errors"]["ids"]["listed"] == [
        {"line": 1, "column": 1, "token": "user1", "reason": NOT_A_NUMBER}
    ]


@pytest.mark.parametrize("header", ["yes", "1", "TRUE", ""])
def test_header_is_true_or_false_only(client, header):
    answer = client.post(f"{TASKS}?task_name=t&header={header}", data="1", content_type="text/csv")
    assert answer.status_code == 422
    assert list(answer.json["errors"]) == ["header"]


@pytest.mark.parametrize(
    ("query", "body", "status", "clue"),
    [
        ("?task_name=", "1,2", 422, "task_name"),
        ("?task_name=t&overflow=later", "1,2", 422, "overflow"),
        ("?task_name=t", "", 422, "no IDs"),
        ("?task_name=t", " ,\n, ", 422, "no IDs"),
        ("?task_name=t", "1," + "9" * 5000, 422, "longer than"),
    ],
)
def test_bad_text_submissions_store_nothing(app, client, query, body, status, clue):
    answer = client.post(f"{TASKS}{query}", data=body, content_type="text/csv")
    assert answer.status_code == status
    assert clue in answer.get_data(as_text=True)
    assert stored_chunks(app) == 0


def test_more_ids_than_allowed_is_413_and_stores_nothing(make_app):
    app = make_app(MAX_IDS_PER_TASK=20_000)
    body = ",".join(str(i) for i in range(1, 20_002))
    answer = app.test_client().post(f"{TASKS}?task_name=t", data=body, content_type="text/csv")
    assert answer.status_code == 413
    assert "at most 20000 IDs" in answer.json["message"]
    assert stored_chunks(app) == 0


def test_a_text_body_longer_than_the_id_limit_allows_is_413(make_app):
    app = make_app(MAX_IDS_PER_TASK=2)
    answer = app.test_client().post(
        f"{TASKS}?task_name=t", data="1," + " " * 100 + "2", content_type="text/csv"
    )
    assert answer.status_code == 413


def test_the_stream_reassembles_tokens_cut_between_blocks():
    body = b",".join(str(i).encode() for i in range(1, 2000))
    assert list(stream_ids(io.BytesIO(body), read_size=7)) == list(range(1, 2000))


def test_the_stream_reports_every_bad_token_up_to_the_cap():
    with pytest.raises(InvalidIds) as caught:
        list(stream_ids(io.BytesIO(b"0 1 abc 9223372036854775808 00012"), read_size=3))
    assert [bad.column for bad in caught.value.listed] == [1, 5, 9]
