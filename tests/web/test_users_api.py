import json

from sqlalchemy import text

from service.core.extensions import db
from service.core.models import User


def test_create_then_read_a_user(client):
    created = client.post("/users/", json={"name": "Ada"})
    assert created.status_code == 201
    user = created.json
    assert user["name"] == "Ada"
    assert user["times_processed"] == 0
    assert user["last_processed_at"] is None
    assert client.get(f"/users/{user['id']}/").json == user


def test_a_user_may_be_created_with_its_id(client):
    assert client.post("/users/", json={"id": 42, "name": "Forty-two"}).json["id"] == 42
    # The next user without an id does not collide with the explicit one.
    assert client.post("/users/", json={"name": "next"}).json["id"] == 43


def test_a_taken_id_is_a_conflict(client):
    client.post("/users/", json={"id": 7, "name": "first"})
    answer = client.post("/users/", json={"id": 7, "name": "second"})
    assert answer.status_code == 409
    assert answer.json["message"] == "a user with this id already exists"
    assert client.get("/users/7/").json["name"] == "first"


def test_users_are_listed_newest_first_with_pagination(client):
    for name in ("a", "b", "c"):
        client.post("/users/", json={"name": name})
    page = client.get("/users/?page=1&page_size=2")
    assert [u["name"] for u in page.json] == ["c", "b"]
    assert json.loads(page.headers["X-Pagination"])["total"] == 3
    assert [u["name"] for u in client.get("/users/?page=2&page_size=2").json] == ["a"]


def test_a_page_past_the_end_is_empty_and_still_counts_the_users(client):
    for name in ("a", "b", "c"):
        client.post("/users/", json={"name": name})
    page = client.get("/users/?page=3&page_size=2")
    assert page.json == []
    assert json.loads(page.headers["X-Pagination"])["total"] == 3


def test_put_replaces_and_patch_updates(client):
    user_id = client.post("/users/", json={"name": "old"}).json["id"]
    assert client.put(f"/users/{user_id}/", json={"name": "new"}).json["name"] == "new"
    assert client.patch(f"/users/{user_id}/", json={}).json["name"] == "new"
    assert client.patch(f"/users/{user_id}/", json={"name": "newer"}).json["name"] == "newer"


def test_put_without_a_name_is_refused(client):
    user_id = client.post("/users/", json={"name": "old"}).json["id"]
    answer = client.put(f"/users/{user_id}/", json={})
    assert answer.status_code == 422
    assert "name" in answer.json["errors"]


def test_the_id_of_a_user_cannot_be_changed(client):
    user_id = client.post("/users/", json={"name": "x"}).json["id"]
    answer = client.patch(f"/users/{user_id}/", json={"id": 99})
    assert answer.status_code == 422
    assert answer.json["errors"]["id"] == ["Unknown field."]


def test_delete_removes_the_user(app, client):
    user_id = client.post("/users/", json={"name": "gone"}).json["id"]
    assert client.delete(f"/users/{user_id}/").status_code == 204
    assert client.get(f"/users/{user_id}/").status_code == 404
    with app.app_context():
        assert User.query.count() == 0


def test_a_missing_user_is_404_with_a_message(client):
    answer = client.get("/users/12345/")
    assert answer.status_code == 404
    assert answer.json["message"] == "user 12345 does not exist"
    assert client.delete("/users/12345/").status_code == 404
    assert client.patch("/users/12345/", json={"name": "x"}).status_code == 404


def test_ids_run_out_above_the_largest_possible_one(client):
    top = 2**63 - 1
    assert client.post("/users/", json={"id": top, "name": "last"}).status_code == 201
    refused = client.post("/users/", json={"name": "no room"})
    assert refused.status_code == 409
    assert "give the user an id" in refused.json["message"]
    client.delete(f"/users/{top}/")
    assert client.post("/users/", json={"name": "room again"}).status_code == 201


def test_nothing_but_the_service_numbers_users(app):
    # A user created without an id takes the next above the largest; an identity column
    # counting from 1 beside it would be a second, unused, numbering.
    with app.app_context():
        column = db.session.execute(
            text(
                "SELECT is_identity, column_default FROM information_schema.columns "
                "WHERE table_name = 'users' AND column_name = 'id'"
            )
        ).one()
    assert tuple(column) == ("NO", None)
    assert User.__table__.c.id.identity is None
