"""A limit's destination is the operator's: written only under DOWNSTREAM_URLS (and with
a secret only under its prefix), and a limit written earlier that the settings no
longer allow is held, never failed, until they allow it or its URL changes; then its
overdue IDs are planned again from that moment."""

import importlib.util
import logging
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from service.core.config import HTTP_PROCESSOR, SecretSetting
from service.core.extensions import db
from service.core.models import Limit
from service.dispatch.reconcile import reconcile
from service.dispatch.slot_runs import run_slot
from service.jobs import get_scheduler
from service.limits import store as limits
from service.planning.preview import preview_plan
from service.planning.windows import plan_stored_task

from ..downstream import Record, Server
from ..helpers import (
    FIRST_SLOT,
    PAST,
    add_limit,
    assignment_rows,
    at,
    slots_by_id,
    snapshot,
    submit,
)
from ..processes import ROOT

LIMITS = "/limits/"
ALLOWED = "http://127.0.0.1:*/,https://api.example.com/v1"
PARTNER = SecretSetting("PARTNER", "Bearer partner-t0ken", "https://api.example.com/v1/partner/")
RESUMED = at("2026-01-05 09:05:20")  # 09:00 to 09:05 have passed; 09:06 to 09:14 are open
# What a closed deployment allows: none of the limits the tests write.
ELSEWHERE = "http://crm.internal/"


def slot(m: int) -> datetime:
    return FIRST_SLOT + timedelta(minutes=m)


def http_limit(url: str, **options) -> dict:
    return {
        "name": "partner",
        "rpm": 3,
        "processor": HTTP_PROCESSOR,
        "options": {"url": url, **options},
    }


@pytest.fixture
def open_app(make_app):
    return make_app(DOWNSTREAM_URLS=ALLOWED, secrets=(PARTNER,), PACING=False)


@pytest.mark.parametrize(
    "url,options,field,says",
    [
        ("https://elsewhere.example/v1/{id}", {}, "url", "is outside DOWNSTREAM_URLS (allowed: "),
        ("https://api.example.com/v10/{id}", {}, "url", "is outside DOWNSTREAM_URLS"),
        ("https://api.example.com.evil/v1/{id}", {}, "url", "is outside DOWNSTREAM_URLS"),
        ("http://169.254.169.254/latest/{id}", {}, "url", "a cloud metadata address"),
        ("http://169.254.7.7/{id}", {}, "url", "a link-local address, which is never"),
        ("http://metadata.google.internal/v1/{id}", {}, "url", "a cloud metadata name"),
        ("http://10.0.0.5/users/{id}", {}, "url", "10.0.0.5, a private address: allowed only"),
        ("http://192.168.1.9:8080/{id}", {}, "url", "a private address"),
        ("http://localhost:9000/users/{id}", {}, "url", "is outside DOWNSTREAM_URLS"),
        ("https://user:pw@api.example.com/v1/{id}", {}, "url", "must not hold a user or password"),
        ("https://api.example.com/v1/%2e%2e/{id}", {}, "url", "must not hold . or .. segments"),
        ("https://{id}.api.example.com/v1/", {}, "url", "not in its host"),
        (
            "https://api.example.com/v1/partner/{id}",
            {"authorization": "NOPE"},
            "authorization",
            "names no secret of this deployment (DOWNSTREAM_SECRET_<NAME>); it holds: PARTNER",
        ),
        (
            "https://api.example.com/v1/other/{id}",
            {"authorization": "PARTNER"},
            "authorization",
            "PARTNER is sent only to URLs under https://api.example.com/v1/partner/",
        ),
        ("http://127.0.0.1:9000/{id}", {"authorization": "Bearer x"}, "authorization", "NAME"),
    ],
)
def test_a_limit_whose_destination_is_not_allowed_is_refused_when_written(
    open_app, url, options, field, says
):
    client = open_app.test_client()
    before = snapshot(open_app)
    created = client.post(LIMITS, json=http_limit(url, **options))
    assert created.status_code == 422, created.json
    assert created.json["errors"]["options"].keys() == {field}
    assert any(says in message for message in created.json["errors"]["options"][field])
    assert "pw" not in created.get_data(as_text=True)
    assert snapshot(open_app) == before
    # The same for a limit that exists, by PUT and by PATCH.
    assert client.post(LIMITS, json={"name": "partner", "rpm": 3}).status_code == 201
    changed = {"processor": HTTP_PROCESSOR, "options": {"url": url, **options}}
    patched = client.patch(f"{LIMITS}partner/", json=changed)
    assert (patched.status_code, patched.json["errors"]["options"].keys()) == (422, {field})
    replaced = client.put(
        f"{LIMITS}partner/",
        json={**changed, "rpm": 3, "paused": False, "adaptive": True, "max_refusals": 30},
    )
    assert (replaced.status_code, replaced.json["errors"]["options"].keys()) == (422, {field})
    assert client.get(f"{LIMITS}partner/").json["processor"] != HTTP_PROCESSOR


def test_the_refusal_names_the_allowed_prefixes(open_app):
    refused = open_app.test_client().post(LIMITS, json=http_limit("https://other.example/{id}"))
    assert refused.json["errors"]["options"]["url"] == [
        "is outside DOWNSTREAM_URLS (allowed: http://127.0.0.1:*/, https://api.example.com/v1)"
    ]


def test_a_limit_under_a_prefix_is_written_and_shows_its_secrets_name_only(open_app):
    client = open_app.test_client()
    created = client.post(
        LIMITS,
        json=http_limit("https://api.example.com/v1/partner/{id}", authorization="PARTNER"),
    )
    assert created.status_code == 201, created.json
    assert created.json["options"]["authorization"] == "PARTNER"
    assert created.json["held"] is None
    for answer in (created, client.get(LIMITS), client.get(f"{LIMITS}partner/")):
        assert "partner-t0ken" not in answer.get_data(as_text=True)
    local = client.post(LIMITS, json={**http_limit("http://127.0.0.1:9000/a/{id}"), "name": "b"})
    assert local.status_code == 201


def test_unset_downstream_urls_allow_only_processor_http_urls_prefix(make_app):
    closed = make_app(DOWNSTREAM_URLS="")
    refused = closed.test_client().post(LIMITS, json=http_limit("https://api.example.com/{id}"))
    assert refused.json["errors"]["options"]["url"] == [
        "is outside DOWNSTREAM_URLS (allowed: none (DOWNSTREAM_URLS is unset))"
    ]
    own = make_app(DOWNSTREAM_URLS="", PROCESSOR_HTTP_URL="http://127.0.0.1:9000/users/{id}")
    client = own.test_client()
    assert (
        client.post(LIMITS, json=http_limit("http://127.0.0.1:9000/users/{id}/x")).status_code
        == 201
    )
    elsewhere = client.post(
        LIMITS, json={**http_limit("http://127.0.0.1:9000/admin/{id}"), "name": "b"}
    )
    assert elsewhere.json["errors"]["options"]["url"] == [
        "is outside DOWNSTREAM_URLS (allowed: http://127.0.0.1:9000/users/ (PROCESSOR_HTTP_URL))"
    ]


def test_the_command_line_refuses_as_the_api_does(open_app):
    runner = open_app.test_cli_runner()
    result = runner.invoke(
        args=[
            *("limits", "create", "partner", "--rpm", "3"),
            *("--processor", HTTP_PROCESSOR, "--option", "url=http://10.0.0.5/{id}"),
        ]
    )
    assert result.exit_code != 0
    assert "options.url: names 10.0.0.5, a private address" in result.output
    assert "allowed: http://127.0.0.1:*/, https://api.example.com/v1" in result.output
    with open_app.app_context():
        assert limits.find("partner") is None


@pytest.fixture
def downstream():
    record = Record()
    with Server(record) as url:
        yield record, url


@pytest.fixture
def held(make_app, open_app, downstream):
    """A limit of RPM 3 calling the local downstream, 30 IDs planned three a slot from
    09:00 to 09:09, written while the settings allowed it; and an app whose settings do
    not."""
    record, url = downstream
    with open_app.app_context():
        add_limit("partner", 3, HTTP_PROCESSOR, url=url)
        task_id = submit(range(1, 31), limit="partner")
        plan_stored_task(task_id, now=PAST)
    return task_id, make_app(DOWNSTREAM_URLS=ELSEWHERE, PACING=False)


def held_since() -> datetime | None:
    return db.session.scalar(text("SELECT held_since FROM limits WHERE name = 'partner'"))


def test_a_held_limits_slots_claim_nothing_and_get_no_jobs(held, downstream):
    task_id, closed = held
    record, _ = downstream
    with closed.app_context():
        runs = [run_slot("partner", slot(m)) for m in range(6)]
        assert [(run.held, run.claimed, run.paused) for run in runs] == [(True, 0, False)] * 6
        assert {row.status for row in assignment_rows(task_id)} == {"pending"}
        assert {row.attempts for row in assignment_rows(task_id)} == {0}
        assert held_since() is not None
        reconcile(now=RESUMED)
        jobs = [job.id for job in get_scheduler().get_jobs()]
        assert not [job for job in jobs if "partner" in job]
    assert record.calls == [] and record.connections == 0


def test_get_limits_says_why_a_limit_is_held(held):
    _, closed = held
    client = closed.test_client()
    answer = client.get(f"{LIMITS}partner/")
    assert answer.status_code == 200
    assert answer.json["paused"] is False
    assert answer.json["held"] == (
        "its URL names 127.0.0.1, a loopback address: allowed only by a prefix of "
        "DOWNSTREAM_URLS with that host (allowed: http://crm.internal/)"
    )
    listed = {limit["name"]: limit["held"] for limit in client.get(LIMITS).json}
    assert listed == {"default": None, "partner": answer.json["held"]}
    lines = closed.test_cli_runner().invoke(args=["limits", "list"]).output.splitlines()
    assert lines[2].split()[4:6] == ["no", "(held)"]


def test_readiness_names_held_limits_but_not_their_urls_and_stays_ready(held):
    _, closed = held
    answer = closed.test_client().get("/readyz")
    assert answer.status_code == 200
    check = answer.json["checks"]["destinations"]
    assert check["ok"] is True
    assert check["detail"] == (
        "held, their destination not allowed here (see GET /limits/<name>/): partner"
    )
    assert "127.0.0.1" not in answer.get_data(as_text=True)


def test_every_process_names_the_held_limits_in_its_log_at_start(held, caplog, monkeypatch):
    _, closed = held
    caplog.set_level(logging.WARNING)
    runner = closed.test_cli_runner()
    for command in (["worker", "--burst"], ["scheduler", "--burst"]):
        caplog.clear()
        result = runner.invoke(args=command)
        assert result.exit_code == 0, result.output
        assert "limit partner is held: its URL names 127.0.0.1, a loopback" in caplog.text
    # The web: gunicorn's start, from the environment.
    monkeypatch.setenv("DOWNSTREAM_URLS", ELSEWHERE)
    spec = importlib.util.spec_from_file_location("gunicorn_conf", ROOT / "gunicorn.conf.py")
    gunicorn_conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gunicorn_conf)
    caplog.clear()
    gunicorn_conf.on_starting(None)
    assert "limit partner is held: its URL names 127.0.0.1, a loopback" in caplog.text


def test_allowing_the_prefix_lets_a_held_limit_run_its_overdue_ids_planned_again(
    held, open_app, downstream
):
    task_id, closed = held
    record, _ = downstream
    with closed.app_context():
        [run_slot("partner", slot(m)) for m in range(6)]
        reconcile(now=RESUMED)
    # Started again with the prefix allowed: reconcile lets the limit go, as a resume.
    with open_app.app_context():
        expected = preview_plan(range(1, 19), now=RESUMED, limit="partner")["slots"]
        reconcile(now=RESUMED)
        assert held_since() is None
        moved = Counter(s for user_id, s in slots_by_id(task_id).items() if user_id <= 18)
        assert moved == {s["start"]: s["added"] for s in expected}
        assert min(moved) == slot(6)  # nothing left in a slot that passed
        runs = [run_slot("partner", slot(m)) for m in range(15)]
        assert not any(run.held for run in runs)
        assert {row.status for row in assignment_rows(task_id)} == {"done"}
    assert sorted(user_id for _, user_id, _, _ in record.calls) == list(range(1, 31))


def test_a_new_url_lets_a_held_limit_go_planning_its_overdue_ids_from_then(held):
    task_id, closed = held
    client = closed.test_client()
    with closed.app_context():
        run_slot("partner", slot(0))
    before = datetime.now(UTC)
    changed = client.patch(
        f"{LIMITS}partner/",
        json={"options": {"url": "http://crm.internal/users/{id}"}},
    )
    assert changed.status_code == 200, changed.json
    assert changed.json["held"] is None
    with closed.app_context():
        assert held_since() is None
        # Every slot had passed: all 30 are planned again from the change, by the rules:
        # 3 a slot, or spread over at least 8 open slots (SPREAD_MIN_OPEN_SLOTS) when the
        # change comes early enough in a window.
        planned = slots_by_id(task_id)
        assert len(planned) == 30 and min(planned.values()) > before
        assert max(Counter(planned.values()).values()) <= 4


def test_a_paused_and_held_limit_resumed_stays_held_and_its_ids_wait(held):
    task_id, closed = held
    client = closed.test_client()
    assert client.patch(f"{LIMITS}partner/", json={"paused": True}).status_code == 200
    before = slots_by_id_in(closed, task_id)
    resumed = client.patch(f"{LIMITS}partner/", json={"paused": False})
    assert (resumed.json["paused"], resumed.json["held"] is not None) == (False, True)
    assert slots_by_id_in(closed, task_id) == before  # planned again only once let go


def slots_by_id_in(app, task_id):
    with app.app_context():
        return slots_by_id(task_id)


def test_a_limit_held_by_its_secret_is_held_too(make_app, open_app):
    with open_app.app_context():
        add_limit(
            "partner",
            3,
            HTTP_PROCESSOR,
            url="https://api.example.com/v1/partner/{id}",
            authorization="PARTNER",
        )
    unset = make_app(DOWNSTREAM_URLS=ALLOWED)  # the secret is gone
    answer = unset.test_client().get(f"{LIMITS}partner/").json
    assert answer["held"] == (
        "its authorization: names no secret of this deployment (DOWNSTREAM_SECRET_<NAME>); "
        "it holds: none"
    )
    moved = SecretSetting("PARTNER", "Bearer partner-t0ken", "https://api.example.com/v1/other/")
    elsewhere = make_app(DOWNSTREAM_URLS=ALLOWED, secrets=(moved,))
    answer = elsewhere.test_client().get(f"{LIMITS}partner/").json
    assert answer["held"] == (
        "its authorization: PARTNER is sent only to URLs under "
        "https://api.example.com/v1/other/, and the url is not"
    )
    with elsewhere.app_context():
        assert db.session.get(Limit, limits.find("partner").id).held_since is None
        assert run_slot("partner", FIRST_SLOT).held
