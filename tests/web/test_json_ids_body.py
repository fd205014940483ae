"""A task's JSON body, its IDs read into an array of 64-bit integers: the same fields and
the same answers as when json.loads built the whole document, for any body, and the IDs
of a big one where they belong."""

import json
import random
from array import array

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError
from sqlalchemy import text
from webargs.core import parse_json

from service.core.extensions import db
from service.tasks import store as task_store
from service.tasks.ids import MAX_ID, load_json_with_ids
from service.web.schemas import TaskSubmitSchema

from ..helpers import snapshot

TASKS = "/celery_ids_tasks/"
JSON = "application/json"


def _read(schema: TaskSubmitSchema, document: object) -> tuple[str, object]:
    """What the schema makes of a document: its fields (arrays as lists), or its errors."""
    try:
        fields = schema.load(document)
    except ValidationError as error:
        return "refused", error.messages
    return "read", {name: list(v) if isinstance(v, array) else v for name, v in fields.items()}


def _outcome(schema: TaskSubmitSchema, load, body: str) -> tuple[str, object]:
    try:
        document = load(body)
    except (ValueError, RecursionError) as error:
        return type(error).__name__, str(error)
    return _read(schema, document)


ID_LIKE = st.one_of(
    st.sampled_from([0, 1, -1, MAX_ID, MAX_ID + 1, -(2**63), 2**64]),
    st.integers(min_value=1, max_value=MAX_ID),
    st.integers(),
)
SCALARS = st.one_of(
    st.none(), st.booleans(), st.floats(), ID_LIKE, st.text(max_size=4), st.just("1, 2 3")
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=8,
)
ID_LISTS = st.lists(st.one_of(ID_LIKE, ID_LIKE, VALUES), max_size=6)
GOOD_IDS = st.lists(st.integers(min_value=1, max_value=MAX_ID), max_size=6)
KEYS = st.sampled_from(
    ["task_name", "ids", "ids", "payload", "overflow", "limit", "not_before", "extra"]
)
# Members of a body that reads, mostly; and any member at all.
GOOD_MEMBERS = st.one_of(
    st.tuples(st.just("task_name"), st.text(max_size=4)),
    st.tuples(st.just("ids"), GOOD_IDS),
    st.tuples(st.just("payload"), GOOD_IDS.map(lambda ids: " ,".join(map(str, ids)))),
    st.tuples(st.just("overflow"), st.sampled_from(["spread", "defer"])),
)
MEMBERS = st.lists(
    st.one_of(GOOD_MEMBERS, GOOD_MEMBERS, st.tuples(KEYS, st.one_of(ID_LISTS, VALUES))),
    max_size=5,
)


def _body(members: list, separator: str) -> str:
    # Written member by member, so that a key may come twice, as a client may send it.
    pairs = (f"{json.dumps(key)}:{separator}{json.dumps(value)}" for key, value in members)
    return "{" + f",{separator}".join(pairs) + "}"


@settings(max_examples=300, deadline=None)
# The first list's IDs come before the second's, which is the one that counts.
@example([("ids", [5, 6]), ("task_name", "t"), ("ids", [7])], " ", False, None)
@given(
    members=MEMBERS,
    separator=st.sampled_from(["", " ", "\n\t"]),
    partial=st.booleans(),
    cut=st.sampled_from([None, None, None, 0.3, 0.6, 0.9, 0.99]),
)
def test_any_body_reads_as_json_loads_would_have_it_read(members, separator, partial, cut):
    body = _body(members, separator)
    if cut is not None:  # and cut short: malformed, mostly
        body = body[: int(len(body) * cut)]
    schema = TaskSubmitSchema(partial=partial)
    assert _outcome(schema, load_json_with_ids, body) == _outcome(schema, json.loads, body)


@pytest.fixture
def stored_as(monkeypatch) -> list:
    """The type of every set of IDs COPYed to PostgreSQL, in order."""
    seen, store = [], task_store.store_distinct_ids

    def noting(cur, table, task_id, ids, *args):
        seen.append(type(ids))
        return store(cur, table, task_id, ids, *args)

    monkeypatch.setattr(task_store, "store_distinct_ids", noting)
    return seen


def test_a_json_body_s_ids_reach_postgresql_as_an_array(client, stored_as):
    submitted = client.post(TASKS, json={"task_name": "t", "ids": [3, 1, 2]})
    client.post(TASKS, json={"task_name": "t", "payload": "3,1,2"})
    client.post(f"{TASKS}preview", json={"task_name": "t", "ids": [3, 1, 2]})
    client.put(f"{TASKS}{submitted.json['id']}/", json={"task_name": "t", "ids": [4]})
    client.patch(f"{TASKS}{submitted.json['id']}/", json={"payload": "5 6"})
    assert stored_as == [array] * 5


def _ids(count: int) -> list[int]:
    """Distinct IDs of 7 to 10 digits."""
    return random.Random(count).sample(range(1_000_000, 10_000_000_000), count)


def _json(**fields) -> bytes:
    return json.dumps({"task_name": "big", **fields}).encode()


def _stored_ids(app, task_id: int) -> list[int]:
    with app.app_context():
        chunks = db.session.execute(
            text("SELECT ids FROM task_id_chunks WHERE task_id = :t ORDER BY chunk_no"),
            {"t": task_id},
        ).scalars()
        return [user_id for chunk in chunks for user_id in chunk]


@pytest.mark.parametrize("form", ["ids", "payload"])
def test_a_big_json_body_stores_its_ids_in_order_without_repeats(app, client, stored_as, form):
    ids = _ids(200_000)
    ids[150_000:150_010] = ids[:10]  # ten repeats, dropped where they come again
    body = _json(ids=ids) if form == "ids" else _json(payload=", ".join(map(str, ids)))
    answer = client.post(TASKS, data=body, content_type="application/json")
    assert answer.status_code == 202, answer.json
    assert (answer.json["total"], answer.json["duplicates"]) == (199_990, 10)
    assert _stored_ids(app, answer.json["id"]) == list(dict.fromkeys(ids))
    assert stored_as == [array]


def test_a_big_json_body_replaces_a_task_s_ids_and_the_same_ids_keep_them(app, client, stored_as):
    task_id = client.post(TASKS, json={"task_name": "t", "ids": [1, 2]}).json["id"]
    ids = _ids(150_000)
    replaced = client.put(f"{TASKS}{task_id}/", data=_json(ids=ids), content_type=JSON)
    assert replaced.status_code == 200, replaced.json
    assert replaced.json["total"] == len(ids)
    # The same IDs, each sent twice: the same task's IDs, only the repeats counted.
    again = client.patch(f"{TASKS}{task_id}/", data=_json(ids=ids + ids), content_type=JSON)
    assert again.status_code == 200, again.json
    assert (again.json["total"], again.json["duplicates"]) == (len(ids), len(ids))
    assert _stored_ids(app, task_id) == ids
    assert stored_as == [array] * 3


def test_a_big_json_body_s_bad_ids_are_counted_and_named_by_index(app, client):
    ids = _ids(300_000)
    ids[1], ids[299_998] = -5, 2**63
    ids.append(True)
    before = snapshot(app)
    for path in (TASKS, f"{TASKS}preview"):
        answer = client.post(path, data=_json(ids=ids), content_type=JSON)
        assert answer.status_code == 422
        details = answer.json["errors"]["ids"]
        assert (details["invalid"], details["submitted"]) == (3, 300_001)
        assert [(bad["index"], bad["token"]) for bad in details["listed"]] == [
            (1, "-5"),
            (299_998, str(2**63)),
            (300_000, "true"),
        ]
    assert snapshot(app) == before


def test_a_big_json_body_cut_short_is_refused_as_json_loads_refuses_it(app, client):
    body = _json(ids=_ids(300_000))[:-1000]
    with pytest.raises(ValueError) as expected:
        json.loads(body.decode())
    before = snapshot(app)
    answer = client.post(TASKS, data=body, content_type=JSON)
    assert answer.status_code == 400
    assert answer.json["message"] == f"Invalid JSON body: {expected.value}"
    assert snapshot(app) == before


def test_a_body_that_is_not_utf_8_is_refused_in_webargs_words(client):
    body = b'{"task_name": "t",\n "ids": [1, 2, "\xff"]}'
    with pytest.raises(json.JSONDecodeError) as expected:
        parse_json(body)
    answer = client.post(TASKS, data=body, content_type=JSON)
    assert answer.status_code == 400
    assert answer.json["message"] == f"Invalid JSON body: {expected.value}"


def test_too_many_ids_are_refused_only_when_they_would_replace_a_task_s_own(make_app, stored_as):
    client = make_app(MAX_IDS_PER_TASK=3).test_client()
    task_id = client.post(TASKS, json={"task_name": "t", "ids": [1, 2, 3]}).json["id"]
    # Four submitted, the task's own three: no change, however many came.
    same = client.patch(f"{TASKS}{task_id}/", json={"ids": [1, 2, 3, 3]})
    assert (same.status_code, same.json["duplicates"]) == (200, 1)
    refused = client.patch(f"{TASKS}{task_id}/", json={"ids": [4, 5, 6, 7]})
    assert refused.status_code == 413
    assert "at most 3 IDs" in refused.json["message"]
    assert client.get(f"{TASKS}{task_id}/").json["total"] == 3
    assert stored_as == [array, array, array]
