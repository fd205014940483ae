"""Log lines: one per request with its request id, one per slot run, as text or JSON."""

import json
import logging
import sys

import pytest

from service.core.logs import JsonFormatter, TextFormatter
from service.dispatch import claimers
from service.dispatch.pacing import Clock
from service.dispatch.slot_runs import run_slot
from service.limits.store import DEFAULT
from service.planning.windows import plan_stored_task
from service.web.access import request_id_from

from ..helpers import FIRST_SLOT, PAST, submit
from ..processes import run_python


def request_lines(caplog) -> list[dict]:
    return [record.fields for record in caplog.records if record.name == "service.requests"]


def test_a_request_gets_one_line_with_its_figures_and_the_clients_request_id(client, caplog):
    caplog.set_level(logging.INFO)
    answer = client.get("/users/?page=1", headers={"X-Request-ID": "req-42.a:b"})
    assert answer.status_code == 200
    assert answer.headers["X-Request-ID"] == "req-42.a:b"
    [line] = request_lines(caplog)
    assert line["method"] == "GET"
    assert line["path"] == "/users/"
    assert line["status"] == 200
    assert line["request_id"] == "req-42.a:b"
    assert 0 <= line["duration_ms"] < 60_000


def test_without_an_id_one_is_made_and_echoed_on_errors_too(client, caplog):
    caplog.set_level(logging.INFO)
    missing = client.get("/users/999/")
    refused = client.post("/users/", data="x", content_type="text/xml")
    assert (missing.status_code, refused.status_code) == (404, 415)
    made = [missing.headers["X-Request-ID"], refused.headers["X-Request-ID"]]
    assert all(len(request_id) == 32 for request_id in made)
    assert made[0] != made[1]
    assert [line["request_id"] for line in request_lines(caplog)] == made
    assert [line["status"] for line in request_lines(caplog)] == [404, 415]


def test_a_refused_token_is_logged_with_its_id(make_app, caplog):
    caplog.set_level(logging.INFO)
    guarded = make_app(API_TOKEN="s3cret-0123456789").test_client()
    answer = guarded.get("/users/", headers={"X-Request-ID": "probe-1"})
    assert (answer.status_code, answer.headers["X-Request-ID"]) == (401, "probe-1")
    assert [(line["status"], line["request_id"]) for line in request_lines(caplog)] == [
        (401, "probe-1")
    ]


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("abc\r\nSet-Cookie: x=1", "abcSet-Cookie:x=1"),
        ("a b\tc\"d'e", "abcde"),
        ("x" * 500, "x" * 128),
    ],
)
def test_a_request_id_is_kept_to_safe_characters_and_a_bounded_length(given, kept):
    assert request_id_from(given) == kept


def test_the_kept_id_is_the_one_echoed(client):
    echoed = client.get("/", headers={"X-Request-ID": "y" * 500 + " z"}).headers["X-Request-ID"]
    assert echoed == "y" * 128


def test_an_id_of_only_unsafe_characters_is_replaced(client):
    echoed = client.get("/", headers={"X-Request-ID": "<>{}"}).headers["X-Request-ID"]
    assert len(echoed) == 32 and echoed.isalnum()


def test_a_slot_run_gets_one_line_with_its_figures(rpm3, caplog):
    caplog.set_level(logging.INFO)
    plan_stored_task(submit(range(1, 8)), now=PAST)
    run_slot(DEFAULT, FIRST_SLOT)
    [line] = [r.fields for r in caplog.records if r.name == "service.dispatch"]
    assert line["slot"] == FIRST_SLOT.isoformat()
    assert (line["claimed"], line["processed"], line["done"], line["failed"]) == (3, 3, 3, 0)
    assert line["handed_back"] == 0
    assert line["lateness_seconds"] > 86400  # the slot was months ago


def record_with_fields(message="GET /users/ 200", **fields) -> logging.LogRecord:
    record = logging.LogRecord("service.requests", logging.INFO, __file__, 1, message, (), None)
    record.fields = fields
    return record


def test_the_json_format_is_one_object_per_line_with_the_fields():
    record = record_with_fields(method="GET", path="/a b\n", status=200, request_id="r1")
    line = JsonFormatter().format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert {"ts", "level", "logger", "message"} <= set(parsed)
    assert (parsed["level"], parsed["logger"]) == ("INFO", "service.requests")
    assert parsed["message"] == "GET /users/ 200"
    assert (parsed["path"], parsed["status"], parsed["request_id"]) == ("/a b\n", 200, "r1")
    assert parsed["ts"].endswith("+00:00")


def test_the_json_format_carries_the_traceback():
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "ValueError: boom" in json.loads(JsonFormatter().format(record))["exc_info"]


def test_the_text_format_appends_the_fields_one_line_each():
    line = TextFormatter().format(record_with_fields(path="/a b\n", status=200))
    assert line.endswith('INFO service.requests: GET /users/ 200 path="/a b\\n" status=200')


def test_a_worker_started_by_the_cli_logs_in_the_configured_format(app):
    command = ["-m", "flask", "--app", "wsgi", "worker", "--burst"]
    finished = run_python(command, {"LOG_FORMAT": "json"})
    lines = (finished.stdout + finished.stderr).splitlines()
    parsed = [json.loads(line) for line in lines]
    assert any(line["logger"].startswith("rq.worker") for line in parsed)


def test_a_slot_job_stopped_before_its_slot_logs_no_negative_lateness(rpm3, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    plan_stored_task(submit([1, 2]), now=PAST)
    monkeypatch.setattr(claimers, "_stop_requested", True)  # its worker is stopping
    # Five seconds before the slot: the stop ends the wait at once.
    early = Clock(seconds=lambda: FIRST_SLOT.timestamp() - 5)
    run = run_slot(DEFAULT, FIRST_SLOT, clock=early)
    [record] = [r for r in caplog.records if r.name == "service.dispatch"]
    assert (run.claimed, run.lateness_seconds, run.stopped_before_start) == (0, 0.0, True)
    assert "stopped before its start" in record.getMessage()
    assert "-" not in f"{record.fields['lateness_seconds']}"


def test_a_message_cannot_forge_a_log_line_in_the_text_format():
    # A path from a client, with a line feed in it, as the request log writes it.
    forged = "GET /users/\nINFO service.requests: GET /admin 200"
    record = logging.LogRecord("service.requests", logging.INFO, __file__, 1, forged, (), None)
    line = TextFormatter().format(record)
    assert "\n" not in line and "\r" not in line
    assert "/users/\\nINFO service.requests" in line
