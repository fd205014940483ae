import base64

import pytest


@pytest.fixture
def guarded(make_app):
    return make_app(API_TOKEN="s3cret").test_client()


def test_without_a_token_the_api_answers_401(guarded):
    answer = guarded.get("/users/")
    assert answer.status_code == 401
    assert "API token" in answer.json["message"]
    assert answer.headers["WWW-Authenticate"].startswith("Basic")


@pytest.mark.parametrize(
    "header", ["Bearer s3cret", "Token s3cret", "Basic " + base64.b64encode(b"ops:s3cret").decode()]
)
def test_the_token_opens_the_api(guarded, header):
    assert guarded.get("/users/", headers={"Authorization": header}).status_code == 200


def test_the_plan_pages_need_the_token_a_browser_sends_as_basic(guarded):
    basic = {"Authorization": "Basic " + base64.b64encode(b"ops:s3cret").decode()}
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
