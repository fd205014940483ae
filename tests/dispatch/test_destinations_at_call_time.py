"""Each call is checked again when it is made, against the address its host resolves to
(a resolver stands in for the system's, so that no name is ever looked up on a network),
and connects to that very address; a refused call fails its ID saying why, calling
nothing."""

import shutil
import socket
import subprocess
import uuid

import pytest
from sqlalchemy import text

from service.core.config import HTTP_PROCESSOR
from service.core.extensions import db
from service.dispatch.slot_runs import run_slot
from service.planning.windows import plan_stored_task
from service.processors import builtin
from service.processors.contract import MAX_ERROR_CHARS

from ..downstream import Record, Server
from ..helpers import FIRST_SLOT, PAST, add_limit, assignment_rows, call_http_request, submit

OPTIONS = {"method": "POST", "timeout": 2.0}


def resolving(answers: dict[str, list[str]], asked: list | None = None):
    """A resolver answering from `answers`; any other name does not resolve."""

    def resolve(host: str, port: int) -> list[str]:
        if asked is not None:
            asked.append(host)
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return answers[host]

    return resolve


@pytest.fixture
def downstream():
    record = Record()
    server = Server(record)
    with server as url:
        yield record, server.port, url


def app_resolving(make_app, allowed: str, answers: dict):
    app = make_app(DOWNSTREAM_URLS=allowed, PACING=False, MAX_ATTEMPTS=1)
    app.config["DOWNSTREAM_RESOLVER"] = resolving(answers)
    return app


@pytest.mark.parametrize(
    "address,says",
    [
        ("127.0.0.1", "a loopback address, which no prefix of DOWNSTREAM_URLS names"),
        ("10.1.2.3", "a private address, which no prefix of DOWNSTREAM_URLS names"),
        ("0.0.0.0", "an unspecified address, which no prefix of DOWNSTREAM_URLS names"),
        ("169.254.169.254", "a cloud metadata address, which is never allowed"),
        ("::ffff:169.254.169.254", "a cloud metadata address, which is never allowed"),
    ],
)
def test_a_name_resolving_to_a_refused_address_fails_its_id_calling_nothing(
    make_app, downstream, address, says
):
    record, port, _ = downstream
    # The downstream listens on 127.0.0.1: a call that went out would reach it.
    app = app_resolving(make_app, "http://partner.test:*/", {"partner.test": [address]})
    with app.app_context():
        add_limit("partner", 5, HTTP_PROCESSOR, url=f"http://partner.test:{port}/users/{{id}}")
        task_id = submit([1, 2], limit="partner")
        plan_stored_task(task_id, now=PAST)
        run = run_slot("partner", FIRST_SLOT)
        rows = assignment_rows(task_id)
    assert (run.claimed, run.failed) == (2, 2)
    assert [(row.status, row.attempts) for row in rows] == [("failed", 1)] * 2
    assert rows[0].error == (
        f"not called: http://partner.test:{port}/users/1 resolves to {address}, {says}"
    )
    assert record.calls == [] and record.connections == 0


def test_a_call_connects_to_the_address_that_was_checked(make_app):
    """The name is resolved once, by the checked resolver, and the connection goes to
    its answer: here 127.0.0.2, where the downstream listens, while the system would
    answer 127.0.0.1 for localhost, where nothing does."""
    record = Record()
    server = Server(record, address="127.0.0.2")
    asked = []
    with server:
        app = make_app(DOWNSTREAM_URLS="http://localhost:*/", PACING=False)
        app.config["DOWNSTREAM_RESOLVER"] = resolving({"localhost": ["127.0.0.2"]}, asked)
        with app.app_context():
            url = f"http://localhost:{server.port}/users/{{id}}"
            add_limit("partner", 5, HTTP_PROCESSOR, url=url)
            task_id = submit([1, 2, 3], limit="partner")
            plan_stored_task(task_id, now=PAST)
            run = run_slot("partner", FIRST_SLOT)
    assert run.done == 3, [row.error for row in assignment_rows_in(app, task_id)]
    assert sorted(user_id for _, user_id, _, _ in record.calls) == [1, 2, 3]
    assert set(record.hosts) == {f"localhost:{server.port}"}  # asked for by its name
    assert set(asked) == {"localhost"}


def certificate_for(name: str, folder) -> tuple[str, str]:
    """A self-signed certificate naming `name`, and its key, as files (openssl)."""
    cert, key = str(folder / f"{name}.pem"), str(folder / f"{name}.key")
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", key, "-out", cert, "-subj", f"/CN={name}"),
            *("-addext", f"subjectAltName=DNS:{name}"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl to make a certificate")
@pytest.mark.parametrize("named", ["localhost", "elsewhere.test"])
def test_an_https_call_to_the_checked_address_verifies_the_certificate_of_the_name(
    make_app, tmp_path, monkeypatch, named
):
    """Connected to the checked address, the call still asks for the URL's name (TLS
    server name and Host): a certificate for that name is accepted, one for another
    name is not, though both servers hold the address."""
    cert, key = certificate_for(named, tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", cert)  # trusted by the clients made from now
    monkeypatch.setattr(builtin, "_clients", {})
    record = Record()
    server = Server(record, address="127.0.0.2", certificate=(cert, key))
    with server:
        app = make_app(DOWNSTREAM_URLS="https://localhost:*/", PACING=False, MAX_ATTEMPTS=1)
        app.config["DOWNSTREAM_RESOLVER"] = resolving({"localhost": ["127.0.0.2"]})
        with app.app_context():
            options = {**OPTIONS, "url": f"https://localhost:{server.port}/users/{{id}}"}
            verdict = call_http_request(1, "key", options)
    if named == "localhost":
        assert verdict is None
        assert record.hosts == [f"localhost:{server.port}"]
    else:
        assert "CERTIFICATE_VERIFY_FAILED" in verdict.message
        assert record.calls == []


def assignment_rows_in(app, task_id):
    with app.app_context():
        return assignment_rows(task_id)


def test_a_url_that_the_settings_no_longer_allow_is_not_called(make_app, downstream):
    record, port, url = downstream
    app = make_app(DOWNSTREAM_URLS="http://crm.internal/")
    with app.test_request_context():
        verdict = call_http_request(7, "key", {**OPTIONS, "url": url})
    assert verdict.retry is False
    assert verdict.message.startswith(
        f"not called: http://127.0.0.1:{port}/users/7 names 127.0.0.1, a loopback address"
    )
    assert record.connections == 0


def test_a_name_that_does_not_resolve_is_retried(make_app):
    app = app_resolving(make_app, "http://partner.test/", {})
    with app.test_request_context():
        verdict = call_http_request(7, "key", {**OPTIONS, "url": "http://partner.test/u/{id}"})
    assert verdict.retry is True
    assert verdict.message.startswith("cannot resolve the host of http://partner.test/u/7: ")


def test_a_refusal_is_stored_bounded_and_without_the_query(make_app, downstream):
    record, port, _ = downstream
    long_path = "/".join(uuid.uuid4().hex for _ in range(20))
    app = app_resolving(make_app, "http://partner.test:*/", {"partner.test": ["10.9.9.9"]})
    with app.app_context():
        url = f"http://partner.test:{port}/{long_path}/{{id}}?token=s3cret"
        add_limit("partner", 5, HTTP_PROCESSOR, url=url)
        task_id = submit([1], limit="partner")
        plan_stored_task(task_id, now=PAST)
        run_slot("partner", FIRST_SLOT)
        error = db.session.execute(
            text("SELECT error FROM assignments WHERE task_id = :t"), {"t": task_id}
        ).scalar()
    assert error.startswith(f"not called: http://partner.test:{port}/")
    assert len(error) == MAX_ERROR_CHARS and error.endswith("…")
    assert "s3cret" not in error and "?" not in error
    assert record.connections == 0


def test_a_proxy_named_by_the_environment_never_carries_a_call(make_app, downstream, monkeypatch):
    """A proxy would make the call from a network the address was not checked for, and
    receive its Authorization: the environment's proxy settings are not followed."""
    record, port, _ = downstream
    proxied = Record()
    proxy = Server(proxied)
    with proxy:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{proxy.port}")
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setattr(builtin, "_clients", {})
        app = make_app(DOWNSTREAM_URLS="http://127.0.0.1:*/", PACING=False, MAX_ATTEMPTS=1)
        with app.app_context():
            url = f"http://127.0.0.1:{port}/users/{{id}}"
            add_limit("partner", 5, HTTP_PROCESSOR, url=url)
            task_id = submit([1, 2], limit="partner")
            plan_stored_task(task_id, now=PAST)
            run = run_slot("partner", FIRST_SLOT)
    assert run.done == 2
    assert sorted(user_id for _, user_id, _, _ in record.calls) == [1, 2]
    assert proxied.calls == [] and proxied.connections == 0
