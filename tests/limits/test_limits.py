"""Limits as a resource: created, read, changed and deleted over the API, each checked
when written; the default limit recorded from the settings."""

import sys
from datetime import timedelta

import pytest
from sqlalchemy import text

from service.core.extensions import db
from service.dispatch.slot_runs import run_slot
from service.limits import store as limits
from service.planning import resume as pausing
from service.planning.windows import plan_stored_task

from ..helpers import FIRST_SLOT, PAST, add_limit, at, loads, minute, snapshot, submit

LIMITS = "/limits/"
NOW = at("2030-01-07 10:05:20")
ONE_MINUTE = timedelta(minutes=1)


def test_the_default_limit_is_listed_with_the_deployments_rpm(client):
    answer = client.get(LIMITS)
    assert answer.status_code == 200
    assert answer.json == [
        {
            "name": "default",
            "rpm": 120,
            "processor": "workers.processors:record_user",
            "options": {},
            "paused": False,
            "held": None,
            "adaptive": True,
            "max_refusals": 30,
            "learned_rpm": 120,
            "refusals": 0,
            "last_refusal": None,
            "pending": 0,
            "done": 0,
            "failed": 0,
            "slots_url": "http://localhost/slots/?limit=default",
            "events_url": "http://localhost/limits/default/events/",
        }
    ]


def test_a_limit_is_created_read_changed_and_deleted(client):
    created = client.post(LIMITS, json={"name": "mail-relay", "rpm": 30})
    assert created.status_code == 201
    assert (created.json["processor"], created.json["options"]) == (
        "workers.processors:record_user",
        {},
    )
    assert client.get(f"{LIMITS}mail-relay/").json["rpm"] == 30
    patched = client.patch(f"{LIMITS}mail-relay/", json={"rpm": 60})
    assert (patched.status_code, patched.json["rpm"]) == (200, 60)
    http = {
        "rpm": 10,
        "processor": "workers.processors:http_request",
        "options": {"url": "http://crm.internal/users/{id}"},
        "paused": False,
        "adaptive": True,
        "max_refusals": 30,
    }
    replaced = client.put(f"{LIMITS}mail-relay/", json=http)
    assert replaced.status_code == 200
    assert replaced.json["options"] == {
        "url": "http://crm.internal/users/{id}",
        "method": "POST",
        "timeout": 10.0,
    }
    assert [limit["name"] for limit in client.get(LIMITS).json] == ["default", "mail-relay"]
    assert client.delete(f"{LIMITS}mail-relay/").status_code == 204
    assert client.get(f"{LIMITS}mail-relay/").status_code == 404
    assert client.post(LIMITS, json={"name": "default", "rpm": 5}).status_code == 409


def test_a_limit_with_pending_ids_cannot_be_deleted(app, client):
    client.post(LIMITS, json={"name": "partner", "rpm": 2})
    task = client.post(
        "/celery_ids_tasks/", json={"task_name": "t", "ids": [1, 2, 3], "limit": "partner"}
    )
    assert (task.status_code, task.json["limit"]) == (202, "partner")
    refused = client.delete(f"{LIMITS}partner/")
    assert refused.status_code == 409
    assert "3 pending IDs" in refused.json["message"]
    assert client.get(f"{LIMITS}partner/").json["pending"] == 3
    client.delete(f"/celery_ids_tasks/{task.json['id']}/")
    assert client.delete(f"{LIMITS}partner/").status_code == 204
    # The cancelled task stays readable, naming no limit any more.
    assert client.get(f"/celery_ids_tasks/{task.json['id']}/").json["limit"] is None


def test_the_default_limit_stays(client):
    refused = client.delete(f"{LIMITS}default/")
    assert refused.status_code == 409
    assert "default" in refused.json["message"]


def test_a_new_rpm_applies_from_then_on_and_planned_ids_keep_their_slots(rpm5):
    first = submit(range(1, 11))
    plan_stored_task(first, now=NOW)
    pausing.update_limit(limits.DEFAULT, {"rpm": 2})
    later = submit(range(11, 15))
    plan_stored_task(later, now=NOW)
    planned = loads(at("2030-01-07 10:00"), at("2030-01-07 10:15"))
    # The first task keeps 5 + 5 in 10:06 and 10:07; the later one fills 10:08 and 10:09
    # up to the new RPM of 2.
    assert planned == {minute(6): 5, minute(7): 5, minute(8): 2, minute(9): 2}


def test_rpm_set_as_a_shared_setting_is_the_default_limits(app, runner, client):
    assert runner.invoke(args=["settings", "set", "RPM=7"]).exit_code == 0
    assert client.get(f"{LIMITS}default/").json["rpm"] == 7
    client.patch(f"{LIMITS}default/", json={"rpm": 9})
    assert "RPM=9" in runner.invoke(args=["settings", "show"]).output
    with app.app_context():
        recorded = db.session.execute(text("SELECT count(*) FROM settings WHERE name = 'RPM'"))
        assert recorded.scalar() == 0  # one source of truth: the limit's row


def test_the_processor_gets_its_limits_options(make_app):
    from .. import processors

    processors.tagged.clear()
    with make_app(PACING=False).app_context():
        for tag in ("a", "b"):
            add_limit(f"limit-{tag}", 5, "tests.processors:note_tag", tag=tag)
            plan_stored_task(submit([1, 2], limit=f"limit-{tag}"), now=at("2026-01-05 08:59:50"))
        from service.dispatch.slot_runs import run_slot

        assert run_slot("limit-b", at("2026-01-05 09:00")).done == 2
        assert processors.tagged == [("b", 1), ("b", 2)]  # only limit-b's slot ran
        run_slot("limit-a", at("2026-01-05 09:00"))
    assert processors.tagged[2:] == [("a", 1), ("a", 2)]


BAD_LIMITS = {
    "no name": ({"rpm": 5}, "name"),
    "a name that is no slug": ({"name": "Mail Relay", "rpm": 5}, "name"),
    "a name too long": ({"name": "a" * 64, "rpm": 5}, "name"),
    "a name with a trailing hyphen": ({"name": "mail-", "rpm": 5}, "name"),
    "no rpm": ({"name": "x"}, "rpm"),
    "rpm zero": ({"name": "x", "rpm": 0}, "rpm"),
    "rpm negative": ({"name": "x", "rpm": -3}, "rpm"),
    "rpm a float": ({"name": "x", "rpm": 2.5}, "rpm"),
    "rpm a string": ({"name": "x", "rpm": "5"}, "rpm"),
    "rpm beyond 32 bits": ({"name": "x", "rpm": 2**31}, "rpm"),
    "a processor that is no path": ({"name": "x", "rpm": 5, "processor": "nope"}, "processor"),
    "a processor outside PROCESSOR_MODULES": (
        {"name": "x", "rpm": 5, "processor": "os:getcwd"},
        "PROCESSOR_MODULES",
    ),
    "a processor that is missing": (
        {"name": "x", "rpm": 5, "processor": "workers.processors:nope"},
        "processor",
    ),
    "a processor that is no function": (
        {"name": "x", "rpm": 5, "processor": "workers.processors:RETRYABLE_HTTP"},
        "processor",
    ),
    "options for a processor that takes none": (
        {"name": "x", "rpm": 5, "options": {"url": "http://a/{id}"}},
        "options",
    ),
    "options not an object": ({"name": "x", "rpm": 5, "options": [1]}, "options"),
    "http options without url": (
        {"name": "x", "rpm": 5, "processor": "workers.processors:http_request"},
        "options",
    ),
    "an http url without {id}": (
        {
            "name": "x",
            "rpm": 5,
            "processor": "workers.processors:http_request",
            "options": {"url": "http://a/users"},
        },
        "options",
    ),
    "an http url that is no url": (
        {
            "name": "x",
            "rpm": 5,
            "processor": "workers.processors:http_request",
            "options": {"url": "ftp:/{id}"},
        },
        "options",
    ),
    "an unknown http method": (
        {
            "name": "x",
            "rpm": 5,
            "processor": "workers.processors:http_request",
            "options": {"url": "http://a/{id}", "method": "BREW"},
        },
        "options",
    ),
    "a timeout of zero": (
        {
            "name": "x",
            "rpm": 5,
            "processor": "workers.processors:http_request",
            "options": {"url": "http://a/{id}", "timeout": 0},
        },
        "options",
    ),
    "an unknown field": ({"name": "x", "rpm": 5, "paws": 4}, "paws"),
}


@pytest.mark.parametrize("body,field", BAD_LIMITS.values(), ids=BAD_LIMITS.keys())
def test_a_bad_limit_is_a_422_naming_its_field_and_stores_nothing(app, client, body, field):
    before = snapshot(app)
    answer = client.post(LIMITS, json=body)
    assert (answer.status_code, answer.json["code"]) == (422, 422)
    assert field in str(answer.json["errors"])
    assert snapshot(app) == before


@pytest.mark.parametrize(
    "method,body",
    [("put", {"processor": "x:y"}), ("patch", {"rpm": 0}), ("patch", {"options": {"a": 1}})],
)
def test_a_bad_change_is_a_422_and_changes_nothing(client, method, body):
    client.post(LIMITS, json={"name": "crm", "rpm": 600})
    answer = getattr(client, method)(f"{LIMITS}crm/", json=body)
    assert answer.status_code == 422
    assert client.get(f"{LIMITS}crm/").json["rpm"] == 600


@pytest.mark.parametrize(
    "request_",
    [
        {"json": {"task_name": "t", "ids": [1], "limit": "nowhere"}},
        {"json": {"task_name": "t", "ids": [1], "limit": "Not A Slug"}},
        {"json": {"task_name": "t", "ids": [1], "limit": 5}},
        {"data": "1,2", "content_type": "text/csv", "query_string": {"limit": "nowhere"}},
    ],
)
def test_a_task_naming_no_limit_that_exists_is_a_422_and_stores_nothing(app, client, request_):
    before = snapshot(app)
    answer = client.post("/celery_ids_tasks/", **request_)
    assert answer.status_code == 422
    assert "limit" in str(answer.json)
    assert snapshot(app) == before


def test_unknown_limits_elsewhere(client):
    assert client.get("/slots/?limit=nowhere").status_code == 422
    assert client.get(f"{LIMITS}nowhere/").status_code == 404
    assert client.get(f"{LIMITS}Not_A_Slug/").status_code == 404
    assert client.patch(f"{LIMITS}nowhere/", json={"rpm": 3}).status_code == 404
    assert client.delete(f"{LIMITS}nowhere/").status_code == 404
    answer = client.post(
        "/celery_ids_tasks/preview", json={"task_name": "t", "ids": [1], "limit": "nowhere"}
    )
    assert answer.status_code == 422


def test_a_processor_outside_processor_modules_is_never_imported(client):
    # Importing runs a module's code: a client naming any module could run it.
    assert "wave" not in sys.modules
    answer = client.post("/limits/", json={"name": "x", "rpm": 5, "processor": "wave:open"})
    assert answer.status_code == 422
    assert "PROCESSOR_MODULES" in str(answer.json["errors"]["processor"])
    assert "wave" not in sys.modules


@pytest.mark.parametrize(
    "path",
    [
        "tests.processors:not_a_processor",  # a plain function of an allowed module
        "workers.processors:per_id",  # the contract's own helper
        "workers.processors:Failure",  # a class: callable, and no processor
    ],
)
def test_only_a_function_marked_as_a_processor_is_one(client, path):
    answer = client.post("/limits/", json={"name": "x", "rpm": 5, "processor": path})
    assert answer.status_code == 422
    assert "not marked as a processor" in str(answer.json["errors"]["processor"])
    assert client.get(f"{LIMITS}x/").status_code == 404


def test_a_slot_of_a_limit_naming_an_unmarked_function_fails_its_ids_for_good(rpm3):
    # Written before processors were marked, or by hand: the slot job checks again.
    add_limit("old", 3)
    db.session.execute(
        text("UPDATE limits SET processor = 'tests.processors:not_a_processor' WHERE name = 'old'")
    )
    db.session.commit()
    task_id = submit([1, 2], limit="old")
    plan_stored_task(task_id, now=PAST)
    run = run_slot("old", FIRST_SLOT)
    rows = db.session.execute(
        text("SELECT status, attempts, error FROM assignments WHERE task_id = :t"), {"t": task_id}
    ).all()
    assert (run.claimed, run.failed) == (2, 2)
    assert {(row.status, row.attempts) for row in rows} == {("failed", 1)}
    assert {row.error for row in rows} == {
        "tests.processors:not_a_processor is not marked as a processor "
        "(decorate it with @processor (a group processor) or @per_id)"
    }


def _next_limit_id_is(app, next_id: int) -> None:
    with app.app_context():
        db.session.execute(
            text("SELECT setval(pg_get_serial_sequence('limits', 'id'), :last)"),
            {"last": next_id - 1},
        )
        db.session.commit()


def test_limits_are_created_and_used_past_32767_creations(app, client, make_app):
    # A create-delete loop used to end at the SMALLINT's bound: "integer out of range".
    _next_limit_id_is(app, 32767)
    for name in ("crm", "billing", "mail"):
        assert client.post(LIMITS, json={"name": name, "rpm": 5}).status_code == 201
    assert client.delete(f"{LIMITS}mail/").status_code == 204
    _next_limit_id_is(app, 2**31 - 1)
    assert client.post(LIMITS, json={"name": "last", "rpm": 5}).status_code == 201
    with app.app_context():
        ids = {name: limits.find(name).id for name in ("crm", "billing", "last")}
    assert ids == {"crm": 32767, "billing": 32768, "last": 2**31 - 1}

    tasks = {}
    for name in ("billing", "last"):
        answer = client.post(
            "/celery_ids_tasks/", json={"task_name": "t", "ids": [1, 2, 3], "limit": name}
        )
        assert (answer.status_code, answer.json["limit"]) == (202, name)
        tasks[name] = answer.json["id"]
    with make_app(PACING=False).app_context():
        for task_id in tasks.values():
            plan_stored_task(task_id, now=PAST)
        assert run_slot("billing", FIRST_SLOT).done == 3
        assert loads(FIRST_SLOT, FIRST_SLOT + ONE_MINUTE, "last") == {FIRST_SLOT: 3}
    # Cancelling frees the slots' loads of the widest id too.
    assert client.delete(f"/celery_ids_tasks/{tasks['last']}/").status_code == 204
    assert client.get(f"{LIMITS}billing/").json["done"] == 3
    assert client.get(f"{LIMITS}last/").json["pending"] == 0
    with app.app_context():
        assert loads(FIRST_SLOT, FIRST_SLOT + ONE_MINUTE, "last") == {FIRST_SLOT: 0}
