import base64

import pytest


@pytest.fixture
def guarded(make_app):
    return make_app(API_TOKEN="s3cret-0123456789").test_client()


def test_without_a_token_the_api_answers_401(guarded):
    answer = guarded.get("/users/")
    assert answer.status_code == 401
    assert "API token" in answer.json["message"]
    assert answer.headers["WWW-Authenticate"].startswith("Basic")


@pytest.mark.parametrize(
    "header",
    [
        "Bearer s3cret-0123456789",
        "Token s3cret-0123456789",
        "Basic " + base64.b64encode(b"ops:s3cret-0123456789").decode(),
    ],
)
def test_the_token_opens_the_api(guarded, header):
    assert guarded.get("/users/", headers={"Authorization": header}).status_code == 200


def test_the_plan_pages_need_the_token_a_browser_sends_as_basic(guarded):
    basic = {"Authorization": "Basic " + base64.b64encode(b"ops:s3cret-0123456789").decode()}
    for page in ("/plan", "/plan/slots/2026-01-05T09:00:00Z"):
        assert guarded.get(page).status_code == 401
        assert guarded.get(page, headers=basic).status_code == 200


def test_a_wrong_token_is_refused(guarded):
    assert guarded.get("/users/", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert guarded.get("/rq/", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_root_and_docs_stay_open(guarded):
    assert guarded.get("/").status_code == 200
    assert guarded.get("/openapi.json").status_code == 200
    assert guarded.get("/docs").status_code == 200
    assert guarded.get("/docs/assets/swagger-ui-bundle.js").status_code == 200


def test_with_served_hosts_set_a_request_for_another_host_is_refused(make_app):
    local = make_app(ALLOWED_HOSTS="127.0.0.1,localhost,::1").test_client()
    for host in ("127.0.0.1:8000", "localhost", "[::1]:8000"):
        assert local.get("/users/", headers={"Host": host}).status_code == 200, host
    rebound = local.get("/users/", headers={"Host": "attacker.example:8000"})
    assert rebound.status_code == 400
    assert "attacker.example" in rebound.json["message"]


def test_without_served_hosts_any_host_is_answered(client):
    assert client.get("/users/", headers={"Host": "api.example"}).status_code == 200


BASIC = {"Authorization": "Basic " + base64.b64encode(b"ops:s3cret-0123456789").decode()}
TEXT = {"Content-Type": "text/plain"}


@pytest.mark.parametrize(
    "sent_by",
    [
        {"Origin": "https://elsewhere.example"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site", "Origin": "http://sub.localhost"},
    ],
)
def test_a_change_another_site_makes_a_browser_send_is_refused(guarded, sent_by):
    for method, path in [("post", "/celery_ids_tasks/"), ("get", "/rq/requeue/slots")]:
        answer = getattr(guarded, method)(path, data="1,2,3", headers={**BASIC, **TEXT, **sent_by})
        assert answer.status_code == 403, (method, path)
        assert "another site" in answer.json["message"]
    assert guarded.get("/celery_ids_tasks/", headers=BASIC).json == []  # nothing stored


def test_a_change_from_the_services_own_pages_or_a_plain_client_is_taken(guarded):
    own = {"Origin": "http://localhost", "Sec-Fetch-Site": "same-origin"}
    from_a_page = guarded.post("/celery_ids_tasks/", data="1,2", headers={**BASIC, **TEXT, **own})
    assert from_a_page.status_code == 202
    plain = guarded.post("/celery_ids_tasks/", data="3", headers={**BASIC, **TEXT})
    assert plain.status_code == 202
    # A read from elsewhere is no change: a link to the plan still opens.
    linked = guarded.get("/plan", headers={**BASIC, "Sec-Fetch-Site": "cross-site"})
    assert linked.status_code == 200
