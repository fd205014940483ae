"""ETag and If-None-Match on every GET: 304 while the answer is unchanged."""

from service.planning.windows import plan_stored_task

from ..helpers import at

TASKS = "/celery_ids_tasks/"


def unchanged_then_changed(client, path, change):
    """GET twice with the tag (304, no body), change, GET again (200, a new tag)."""
    first = client.get(path)
    assert first.status_code == 200
    tag = first.headers["ETag"]
    cached = client.get(path, headers={"If-None-Match": tag})
    assert cached.status_code == 304
    assert cached.data == b""
    assert cached.headers["ETag"] == tag
    change()
    changed = client.get(path, headers={"If-None-Match": tag})
    assert changed.status_code == 200
    assert changed.headers["ETag"] != tag


def new_task(client, ids=(1, 2)) -> int:
    return client.post(TASKS, json={"task_name": "t", "ids": list(ids)}).json["id"]


def test_users(client):
    client.post("/users/", json={"id": 1, "name": "Ada"})
    unchanged_then_changed(client, "/users/", lambda: client.post("/users/", json={"name": "B"}))


def test_one_user_and_a_change_without_if_match(client):
    client.post("/users/", json={"id": 1, "name": "Ada"})

    def rename():
        # If-Match stays optional: clients that never read a tag still change things.
        assert client.patch("/users/1/", json={"name": "Grace"}).status_code == 200

    unchanged_then_changed(client, "/users/1/", rename)


def test_tasks(client):
    new_task(client)
    unchanged_then_changed(client, TASKS, lambda: new_task(client))


def test_one_task(client):
    task_id = new_task(client)

    def rename():
        client.patch(f"{TASKS}{task_id}/", json={"task_name": "renamed"})

    unchanged_then_changed(client, f"{TASKS}{task_id}/", rename)


def test_a_task_s_ids(client):
    task_id = new_task(client)

    def replace():
        client.put(f"{TASKS}{task_id}/", json={"task_name": "t", "ids": [3]})

    unchanged_then_changed(client, f"{TASKS}{task_id}/ids/", replace)


def test_the_plan_whatever_its_now_says(app, client):
    task_id = new_task(client)

    def plan():
        with app.app_context():
            plan_stored_task(task_id, now=at("2030-01-07 10:59:50"))

    window = "/slots/?from=2030-01-07T11:00:00Z&to=2030-01-07T11:15:00Z"
    unchanged_then_changed(client, window, plan)


def test_the_pagination_header_is_part_of_the_tag(client):
    client.post("/users/", json={"name": "a"})

    def add_a_user():
        client.post("/users/", json={"name": "b"})

    # Page 3 of one user per page stays empty; only X-Pagination's total changes.
    unchanged_then_changed(client, "/users/?page=3&page_size=1", add_a_user)
    assert client.get("/users/?page=3&page_size=1").json == []


def test_a_weakened_tag_still_matches(client):
    tag = client.get("/users/").headers["ETag"]
    assert client.get("/users/", headers={"If-None-Match": f"W/{tag}"}).status_code == 304
    assert client.get("/users/", headers={"If-None-Match": "*"}).status_code == 304


def test_every_get_documents_the_tag(client):
    paths = client.get("/openapi.json").json["paths"]
    tasks = (
        "/celery_ids_tasks/",
        "/celery_ids_tasks/{task_id}/",
        "/celery_ids_tasks/{task_id}/ids/",
    )
    for path in ("/users/", "/users/{user_id}/", *tasks, "/slots/"):
        get = paths[path]["get"]
        assert "304" in get["responses"]
        assert {"$ref": "#/components/parameters/IF_NONE_MATCH"} in get["parameters"]
    for path in ("/users/{user_id}/", "/celery_ids_tasks/{task_id}/"):
        assert "428" not in paths[path]["put"]["responses"]
