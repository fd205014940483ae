"""Downstream secrets: each named in the environment with its URL prefix, sent as the
Authorization header only to URLs under that prefix (PROCESSOR_HTTP_AUTHORIZATION only
under PROCESSOR_HTTP_URL's), and never shown by an API answer, a log line or an ID's
stored error."""

import logging
import socket

from sqlalchemy import text

from service.core.config import HTTP_PROCESSOR, SecretSetting
from service.core.extensions import db
from service.dispatch.slot_runs import run_slot
from service.limits.store import DEFAULT
from service.planning.windows import plan_stored_task

from ..downstream import Record, Server
from ..helpers import FIRST_SLOT, PAST, add_limit, call_http_request, submit
from ..processes import free_port


def origin(url: str) -> str:
    return url.split("/users/")[0]


def authorizations(record: Record) -> dict[int, str | None]:
    return {user_id: authorization for _, user_id, _, authorization in record.calls}


def run_limit(name: str, ids: list[int]) -> int:
    task_id = submit(ids, limit=name)
    plan_stored_task(task_id, now=PAST)
    run_slot(name, FIRST_SLOT)
    return task_id


def test_a_secret_goes_only_to_urls_under_its_prefix(make_app):
    ours, theirs = Record(), Record()
    with Server(ours) as our_url, Server(theirs) as their_url:
        secret = SecretSetting("OURS", "Bearer our-s3cret", f"{origin(our_url)}/users/")
        app = make_app(secrets=(secret,), PACING=False, RETRY_BACKOFF_SECONDS=3600)
        with app.app_context():
            add_limit("ours", 5, HTTP_PROCESSOR, url=our_url, authorization="OURS")
            add_limit("theirs", 5, HTTP_PROCESSOR, url=their_url)
            run_limit("ours", [1, 2])
            run_limit("theirs", [3])
            # A limit pairing the secret with another URL is refused when written; one
            # stored so anyway (by hand) is not called with it, nor at all.
            refused = app.test_client().post(
                "/limits/",
                json={
                    "name": "sneaky",
                    "rpm": 5,
                    "processor": HTTP_PROCESSOR,
                    "options": {"url": their_url, "authorization": "OURS"},
                },
            )
            stored = {"url": their_url, "method": "POST", "timeout": 2.0, "authorization": "OURS"}
            verdict = call_http_request(4, "key", stored)
    assert authorizations(ours) == {1: "Bearer our-s3cret", 2: "Bearer our-s3cret"}
    assert authorizations(theirs) == {3: None}
    assert refused.status_code == 422
    assert refused.json["errors"]["options"]["authorization"] == [
        f"OURS is sent only to URLs under {origin(our_url)}/users/, and the url is not"
    ]
    assert "s3cret" not in refused.get_data(as_text=True)
    assert verdict.retry is False
    assert verdict.message.endswith("is not under the prefix of its secret OURS")
    assert 4 not in authorizations(theirs)


def test_processor_http_authorization_goes_only_under_processor_http_urls_prefix(make_app):
    default, other = Record(), Record()
    with Server(default) as default_url, Server(other) as other_url:
        app = make_app(
            ID_PROCESSOR=HTTP_PROCESSOR,
            PROCESSOR_HTTP_URL=default_url,
            PROCESSOR_HTTP_AUTHORIZATION="Bearer operator-s3cret",
            PACING=False,
        )
        with app.app_context():
            run_limit(DEFAULT, [1])
            add_limit("other", 5, HTTP_PROCESSOR, url=other_url)  # under 127.0.0.1:*
            run_limit("other", [2])
    assert authorizations(default) == {1: "Bearer operator-s3cret"}
    assert authorizations(other) == {2: None}


SECRETS = ("Bearer grep-local-s3cret", "Bearer grep-named-s3cret", "Bearer grep-operator-s3cret")


def test_no_answer_log_line_or_stored_error_shows_a_secret(make_app, caplog):
    """Calls that succeed, fail with HTTP errors, time out, find nothing listening or
    are refused by the allow-list, every one with a secret; then every answer the API
    gave, every line logged and every stored error is searched for the secrets."""
    record = Record(answers={2: 500, 3: 404, 4: 429}, slow_ids={5: 2.0})
    with Server(record) as url:
        closed = f"http://127.0.0.1:{free_port()}/users/{{id}}"  # nothing listens there
        app = make_app(
            ID_PROCESSOR=HTTP_PROCESSOR,
            PROCESSOR_HTTP_URL=url,
            PROCESSOR_HTTP_AUTHORIZATION=SECRETS[2],
            PROCESSOR_HTTP_TIMEOUT=0.5,
            DOWNSTREAM_URLS="http://127.0.0.1:*/,http://partner.test:*/",
            secrets=(
                SecretSetting("LOCAL", SECRETS[0], "http://127.0.0.1:*/"),
                SecretSetting("NAMED", SECRETS[1], "http://partner.test:*/"),
            ),
            PACING=False,
            RETRY_BACKOFF_SECONDS=3600,
        )
        # partner.test stands for a name whose DNS answers a private address.
        app.config["DOWNSTREAM_RESOLVER"] = lambda host, port: (
            ["10.20.30.40"] if host == "partner.test" else socket_addresses(host, port)
        )
        caplog.set_level(logging.DEBUG)  # after the app, which sets its own level
        client = app.test_client()
        answers = []

        def ask(method: str, path: str, **body):
            answer = client.open(path, method=method, **body)
            answers.append(answer.get_data(as_text=True))
            return answer

        limit = {"rpm": 10, "processor": HTTP_PROCESSOR}
        port = url.split(":")[2].split("/")[0]
        for name, options in {
            "local": {"url": url, "authorization": "LOCAL", "timeout": 0.5},
            "nowhere": {"url": closed, "authorization": "LOCAL", "timeout": 0.5},
            "named": {"url": f"http://partner.test:{port}/users/{{id}}", "authorization": "NAMED"},
        }.items():
            assert (
                ask(
                    "POST", "/limits/", json={**limit, "name": name, "options": options}
                ).status_code
                == 201
            )
        # Refusals that name the secrets.
        assert (
            ask(
                "POST",
                "/limits/",
                json={**limit, "name": "x", "options": {"url": url, "authorization": "UNKNOWN"}},
            ).status_code
            == 422
        )
        assert (
            ask(
                "POST",
                "/limits/",
                json={
                    **limit,
                    "name": "y",
                    "options": {"url": "http://crm.internal/{id}", "authorization": "LOCAL"},
                },
            ).status_code
            == 422
        )
        tasks = {}
        for name in (DEFAULT, "local", "nowhere", "named"):
            answer = ask(
                "POST",
                "/celery_ids_tasks/",
                json={"task_name": name, "ids": [1, 2, 3, 4, 5], "limit": name},
            )
            tasks[name] = answer.json["id"]
        with app.app_context():
            for name, task_id in tasks.items():
                plan_stored_task(task_id, now=PAST)
                run_slot(name, FIRST_SLOT)
            errors = list(
                db.session.execute(
                    text("SELECT error FROM assignments WHERE error IS NOT NULL")
                ).scalars()
            )
        for name, task_id in tasks.items():
            ask("GET", f"/celery_ids_tasks/{task_id}/")
            ask("GET", f"/celery_ids_tasks/{task_id}/ids/")
            ask("GET", f"/limits/{name}/")
        for path in ("/limits/", "/readyz", "/openapi.json", "/plan", "/plan/limits"):
            ask("GET", path)
    sent = {auth for *_, auth in record.calls}
    assert sent == {SECRETS[0], SECRETS[2]}  # the secrets did go, where they may
    kinds = " ".join(errors)
    for outcome in ("HTTP 500", "HTTP 404", "HTTP 429", "timed out", "ConnectError", "not called"):
        assert outcome in kinds, outcome
    shown = "\n".join([*answers, caplog.text, *errors])
    for secret in SECRETS:
        assert secret.split()[1] not in shown


def socket_addresses(host: str, port: int) -> list[str]:
    return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
