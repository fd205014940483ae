"""One log line and one count per request, with a request id that the response echoes.

The id comes from the client's X-Request-ID (a proxy's or a caller's, so one id follows
a request through every system that logs it) or is made here.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from flask import Flask, Response, g, request

from service.ops import metrics

REQUEST_ID_HEADER = "X-Request-ID"
# Long enough for the ids proxies and tracers send; short enough that a client cannot
# fill log lines with it.
MAX_REQUEST_ID_LENGTH = 128
# The id is written into logs and headers as given: nothing that could end a line, a
# header or a key=value pair gets through.
_UNSAFE_IN_REQUEST_ID = re.compile(r"[^A-Za-z0-9._:=+/-]")

log = logging.getLogger("service.requests")


def init_app(app: Flask) -> None:
    app.before_request(_start)
    app.after_request(_finish)


def request_id_from(given: str | None) -> str:
    """The client's id kept to safe characters and a bounded length, or a new one."""
    kept = _UNSAFE_IN_REQUEST_ID.sub("", given or "")[:MAX_REQUEST_ID_LENGTH]
    return kept or uuid.uuid4().hex


def _start() -> None:
    g.request_started = time.perf_counter()
    g.request_id = request_id_from(request.headers.get(REQUEST_ID_HEADER))


def _finish(response: Response) -> Response:
    seconds = time.perf_counter() - g.request_started
    rule = request.url_rule.rule if request.url_rule else None
    metrics.observe_request(request.method, rule, response.status_code, seconds)
    duration_ms = round(seconds * 1000, 2)
    response.headers[REQUEST_ID_HEADER] = g.request_id
    fields = {
        "method": request.method,
        "path": request.path,
        "status": response.status_code,
        "duration_ms": duration_ms,
        "request_id": g.request_id,
    }
    # The name of the token the request was made with (service/web/auth.py), never the
    # token: absent when none was known.
    if "token_name" in g:
        fields["token"] = g.token_name
    log.info(
        "%s %s %s", request.method, request.path, response.status_code, extra={"fields": fields}
    )
    return response
