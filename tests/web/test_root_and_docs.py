import re


def test_root_links_every_collection_and_the_docs(client):
    links = client.get("/").json
    assert links["users"].endswith("/users/")
    assert links["celery_ids_tasks"].endswith("/celery_ids_tasks/")
    assert links["docs"].endswith("/docs")
    assert links["openapi"].endswith("/openapi.json")
    assert links["rq"].endswith("/rq/")
    assert links["plan"].endswith("/plan")


def test_openapi_documents_every_resource(client):
    spec = client.get("/openapi.json").json
    assert {
        "/users/",
        "/users/{user_id}/",
        "/celery_ids_tasks/",
        "/celery_ids_tasks/{task_id}/",
        "/celery_ids_tasks/{task_id}/ids/",
    } <= set(spec["paths"])
    assert not [path for path in spec["paths"] if path.startswith("/plan")]  # HTML, not API
    post = spec["paths"]["/celery_ids_tasks/"]["post"]
    assert "202" in post["responses"]


def test_openapi_gives_list_items_a_schema_without_the_payload(client):
    spec = client.get("/openapi.json").json
    tasks = spec["paths"]["/celery_ids_tasks/"]["get"]["responses"]["200"]
    item = tasks["content"]["application/json"]["schema"]["items"]["$ref"]
    assert item == "#/components/schemas/TaskSummary"
    schemas = spec["components"]["schemas"]
    assert "payload" not in schemas["TaskSummary"]["properties"]
    assert "payload" in schemas["Task"]["properties"]


def test_swagger_ui_is_served_with_its_assets_from_the_app(client):
    page = client.get("/docs")
    assert page.status_code == 200
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert "/docs/assets/swagger-ui-bundle.js" in assets
    assert all(asset.startswith("/docs/assets/") for asset in assets)
    for asset in assets:
        answer = client.get(asset)
        assert answer.status_code == 200, asset
        assert len(answer.data) > 1000, asset


def test_rq_dashboard_is_mounted(client):
    assert client.get("/rq/").status_code == 200
    client.post("/celery_ids_tasks/", json={"task_name": "t", "ids": [1]})  # queues planning
    queues = client.get("/rq/0/data/queues.json").json["queues"]
    assert "planning" in {queue["name"] for queue in queues}
