"""The built-in processors (the contract is in service/processors/contract.py):

- `record_user`, a group processor: records each user in the database, in the
  transaction that records the outcomes;
- `http_request`, a per-ID processor: one HTTP call per ID to the downstream its
  options name (`url`, `method`, `timeout`), made concurrently from a pool of threads
  over pooled keep-alive connections.

Limits name them by their public paths, `workers.processors:record_user` and
`workers.processors:http_request`.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from urllib.parse import urlsplit

import httpx
from flask import current_app
from marshmallow import Schema, ValidationError, fields
from marshmallow.validate import URL, OneOf, Range
from sqlalchemy import text

from service.core.extensions import db
from service.processors.contract import Failure, per_id, processor

# Answers worth another attempt: the resource is busy or broken, not the request.
RETRYABLE_HTTP = {408, 425, 429}


@processor
def record_user(user_ids: list[int]) -> dict[int, Failure]:
    """Create each user if absent; stamp last_processed_at and count the time."""
    times = Counter(user_ids)
    ids = sorted(times)  # rows locked in one order, so two workers never deadlock on them
    db.session.execute(
        text(
            "INSERT INTO users (id, last_processed_at, times_processed) "
            "SELECT u.id, clock_timestamp(), u.n "
            "FROM unnest(CAST(:ids AS bigint[]), CAST(:times AS int[])) AS u(id, n) "
            "ON CONFLICT (id) DO UPDATE SET last_processed_at = EXCLUDED.last_processed_at, "
            "  times_processed = users.times_processed + EXCLUDED.times_processed"
        ),
        {"ids": ids, "times": [times[user_id] for user_id in ids]},
    )
    return {}


def _holds_id(url: str) -> None:
    if "{id}" not in url:
        raise ValidationError("must hold {id}, where each user ID goes")


class HttpOptions(Schema):
    """Options of `http_request`: where and how to call, and how long to wait."""

    url = fields.String(
        required=True,
        validate=[URL(schemes={"http", "https"}, require_tld=False), _holds_id],
        metadata={"description": "the URL of each call, with {id} where the ID goes"},
    )
    method = fields.String(
        load_default="POST", validate=OneOf(["GET", "POST", "PUT", "PATCH", "DELETE"])
    )
    timeout = fields.Float(
        load_default=10.0,
        validate=Range(min=0, max=300, min_inclusive=False),
        metadata={"description": "seconds to wait for each answer"},
    )


@per_id
def http_request(user_id: int, key: str, options: dict) -> Failure | None:
    """One HTTP request to the `url` of the options, `{id}` replaced by the ID.

    It carries the ID's `Idempotency-Key` (the deployment's id, its task and position:
    the same on every attempt), so a downstream that deduplicates by key knows a
    repeated call. It lasts at most `longest_call`, four times the timeout. 2xx is
    done. 429, 408, 425, 5xx, timeouts and connection errors are retried; any other
    answer fails the ID for good.
    """
    template = options.get("url")
    if not template:  # a default limit recorded from settings that set no URL
        return Failure("the limit's options name no url", retry=False)
    url = template.replace("{id}", str(user_id))
    shown = _without_query(url)
    timeout = options["timeout"]
    try:
        with _client(timeout).stream(
            options["method"], url, headers={"Idempotency-Key": key}
        ) as answer:
            _read_briefly(answer, time.monotonic() + (HTTP_CALL_PHASES - 1) * timeout)
    except httpx.TimeoutException:
        return Failure(f"timed out calling {shown}")
    except httpx.HTTPError as exc:
        return Failure(f"{type(exc).__name__} calling {shown}: {exc}")
    if answer.is_success:
        return None
    retry = answer.status_code in RETRYABLE_HTTP or answer.status_code >= 500
    return Failure(f"HTTP {answer.status_code} from {shown}", retry=retry)


def _without_query(url: str) -> str:
    """A URL as an error text names it: a query string may carry a client's token."""
    return urlsplit(url)._replace(query="", fragment="").geturl()


# Each waits at most `timeout`: connecting, sending, the answer's first byte, its last.
HTTP_CALL_PHASES = 4
# Of an answer's body (unused) this much is read, so the connection can serve again.
ANSWER_BYTES = 64 * 1024


def _read_briefly(answer: httpx.Response, deadline: float) -> None:
    """Read the answer, but no more than ANSWER_BYTES and not past the deadline: a
    downstream that trickles its answer cannot stretch a call beyond its budget. An
    answer cut short closes its connection instead of returning it to the pool."""
    read = 0
    for chunk in answer.iter_raw():
        read += len(chunk)
        if read > ANSWER_BYTES or time.monotonic() > deadline:
            return


http_request.options_schema = HttpOptions
http_request.longest_call = lambda options: HTTP_CALL_PHASES * options.get("timeout", 10.0)


_clients: dict[tuple, httpx.Client] = {}
_clients_lock = threading.Lock()


def _client(timeout: float) -> httpx.Client:
    """One pooled client per process, settings and timeout (a forked job must not share
    its parent's sockets), holding up to PROCESSOR_CONCURRENCY keep-alive connections."""
    config = current_app.config
    size = config["PROCESSOR_CONCURRENCY"]
    authorization = config["PROCESSOR_HTTP_AUTHORIZATION"]
    key = (os.getpid(), size, authorization, timeout)
    with _clients_lock:
        if key not in _clients:
            _clients[key] = httpx.Client(
                headers={"Authorization": authorization} if authorization else {},
                timeout=timeout,
                limits=httpx.Limits(max_connections=size, max_keepalive_connections=size),
            )
        return _clients[key]
