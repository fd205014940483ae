import json

from rq import Queue
from sqlalchemy import text

from service.core.extensions import db, get_redis
from service.jobs import PLAN_TASK_JOB, PLANNING_QUEUE


def planning_jobs(app):
    with app.app_context():
        queue = Queue(PLANNING_QUEUE, connection=get_redis())
        return [(job.func_name, job.args) for job in queue.jobs]


def stored_count(user_id):
    """How many tasks hold this ID."""
    query = "SELECT count(*) FROM task_id_chunks c, unnest(c.ids) AS u WHERE u = :id"
    return db.session.execute(text(query), {"id": user_id}).scalar()


def submit(client, **body):
    return client.post("/celery_ids_tasks/", json={"task_name": "t", **body})


def test_original_payload_form_is_accepted_with_the_original_answer(app, client):
    answer = submit(client, payload="3,1,2")
    assert answer.status_code == 202
    task = answer.json
    assert task["message"] == "Task added to queue"
    assert task["task_id"] == task["id"]
    assert task["status"] == "received"
    assert task["task_status"] is False
    assert task["payload"] == "3,1,2"
    assert (task["total"], task["duplicates"], task["pending"]) == (3, 0, 3)
    assert task["overflow"] == "spread"


def test_submission_queues_one_planning_job(app, client):
    task_id = submit(client, ids=[5, 6]).json["id"]
    assert planning_jobs(app) == [(PLAN_TASK_JOB, (task_id,))]


def test_duplicates_inside_a_task_are_dropped_and_counted(app, client):
    task = submit(client, ids=[9, 8, 9, 7, 8, 9], overflow="defer").json
    assert (task["total"], task["duplicates"]) == (3, 3)
    assert task["overflow"] == "defer"
    ids = client.get(f"/celery_ids_tasks/{task['id']}/ids/").json
    assert [(i["position"], i["id"]) for i in ids] == [(0, 9), (1, 8), (2, 7)]
    assert {i["status"] for i in ids} == {"received"}


def test_the_same_id_in_two_tasks_is_kept_twice(app, client):
    submit(client, ids=[1, 2])
    submit(client, ids=[2, 3])
    with app.app_context():
        assert stored_count(2) == 2


def test_large_tasks_do_not_echo_their_ids(client):
    task = submit(client, ids=list(range(1, 1502))).json
    assert task["payload"] is None
    assert task["total"] == 1501
    page = client.get(f"/celery_ids_tasks/{task['id']}/ids/?page=16&page_size=100")
    assert [i["id"] for i in page.json] == [1501]
    assert json.loads(page.headers["X-Pagination"])["total"] == 1501


def test_tasks_are_listed_newest_first(client):
    first = submit(client, ids=[1]).json["id"]
    second = submit(client, ids=[2]).json["id"]
    listed = client.get("/celery_ids_tasks/")
    assert [t["id"] for t in listed.json] == [second, first]
    assert json.loads(listed.headers["X-Pagination"])["total"] == 2


def test_lists_leave_out_the_payload_that_a_task_s_own_page_keeps(client):
    posted = submit(client, payload="1,2,3").json
    listed = client.get("/celery_ids_tasks/").json[0]
    assert "payload" not in listed
    assert listed == {name: value for name, value in posted.items() if name in listed}
    assert set(posted) - set(listed) == {"payload", "message", "task_id", "header_skipped"}
    assert client.get(f"/celery_ids_tasks/{posted['id']}/").json["payload"] == "1,2,3"


def test_each_task_links_to_its_ids(client):
    ids = [submit(client, ids=[n]).json["id"] for n in (1, 2)]
    links = {task["id"]: task["ids_url"] for task in client.get("/celery_ids_tasks/").json}
    assert links == {n: f"http://localhost/celery_ids_tasks/{n}/ids/" for n in ids}
    assert client.get(links[ids[0]]).json[0]["id"] == 1


def test_rename_at_any_time_without_replanning(app, client):
    task_id = submit(client, ids=[1]).json["id"]
    renamed = client.patch(f"/celery_ids_tasks/{task_id}/", json={"task_name": "renamed"})
    assert renamed.json["task_name"] == "renamed"
    assert len(planning_jobs(app)) == 1


def test_put_replaces_the_ids_and_replans(app, client):
    task_id = submit(client, ids=[1, 2, 3]).json["id"]
    replaced = client.put(
        f"/celery_ids_tasks/{task_id}/", json={"task_name": "n", "payload": "4,4,5"}
    )
    assert replaced.status_code == 200
    assert (replaced.json["total"], replaced.json["duplicates"]) == (2, 1)
    assert replaced.json["payload"] == "4,5"
    ids = client.get(f"/celery_ids_tasks/{task_id}/ids/").json
    assert [i["id"] for i in ids] == [4, 5]


def test_delete_cancels_and_keeps_the_task_readable(client):
    task_id = submit(client, ids=[1, 2]).json["id"]
    assert client.delete(f"/celery_ids_tasks/{task_id}/").status_code == 204
    task = client.get(f"/celery_ids_tasks/{task_id}/").json
    assert task["status"] == "cancelled"
    assert task["task_status"] is True
    assert task["pending"] == 0
    ids = client.get(f"/celery_ids_tasks/{task_id}/ids/").json
    assert {i["status"] for i in ids} == {"cancelled"}
    # Cancelling twice is harmless; changing the IDs of a cancelled task is not allowed.
    assert client.delete(f"/celery_ids_tasks/{task_id}/").status_code == 204
    refused = client.patch(f"/celery_ids_tasks/{task_id}/", json={"ids": [3]})
    assert refused.status_code == 409
    assert "cancelled" in refused.json["message"]


def test_a_missing_task_is_404(client):
    for path in ("/celery_ids_tasks/77/", "/celery_ids_tasks/77/ids/"):
        answer = client.get(path)
        assert answer.status_code == 404
        assert answer.json["message"] == "task 77 does not exist"
    assert client.delete("/celery_ids_tasks/77/").status_code == 404


def test_submission_survives_a_redis_outage(make_app):
    app = make_app(REDIS_URL="redis://127.0.0.1:1/0")
    answer = app.test_client().post("/celery_ids_tasks/", json={"task_name": "t", "ids": [1]})
    assert answer.status_code == 202
    with app.app_context():
        assert stored_count(1) == 1
