"""POSTing IDs as a text body, streamed into PostgreSQL."""

import io

import pytest
from sqlalchemy import text

from service.core.extensions import db
from service.tasks.ids import InvalidIds, stream_ids

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


def test_a_bad_token_is_named_by_index_and_nothing_is_stored(app, client):
    answer = client.post(f"{TASKS}?task_name=t", data="1,2,x3,4,-5", content_type="text/csv")
    assert answer.status_code == 422
    assert set(answer.json["errors"]["body"]) == {"2", "4"}
    assert "'x3'" in answer.json["errors"]["body"]["2"][0]
    assert stored_chunks(app) == 0
    assert client.get(TASKS).json == []


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
    assert sorted(caught.value.errors) == [0, 2, 3]
