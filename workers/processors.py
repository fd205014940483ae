"""Processors: the contract a slot job hands IDs through, and the built-in ones.

`ID_PROCESSOR` names a function (`module:function`) of one of two kinds:

- a **group** processor, `process(user_ids: list[int]) -> {user_id: Failure | str}`,
  called with the IDs due together and returning those that failed. It runs inside the
  transaction that records their outcomes, so what it writes to the database commits
  with them, or not at all. Declaring a `keys` parameter
  (`process(user_ids, keys)`) brings each ID's idempotency key alongside it.
- a **per-ID** processor, marked with `@per_id`: `process(user_id: int, key: str) ->
  Failure | str | None`, called once per ID at its turn, from a pool of threads, so that
  calls to a slow downstream overlap (up to PROCESSOR_CONCURRENCY at once) instead of
  delaying the IDs behind them. Its outcomes are recorded in batches, in transactions
  of their own: what it writes elsewhere is not undone with them.

Either kind signals a failure by returning it; an exception fails the ID (a group
processor's, every ID of the call).

Built in:

- `record_user`, a group processor: records each user in the database, in the
  transaction that records the outcomes;
- `http_request`, a per-ID processor: one HTTP call per ID to a downstream, made
  concurrently from a pool of threads over pooled keep-alive connections.
"""

from __future__ import annotations

import functools
import inspect
import os
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module

import httpx
from flask import current_app
from sqlalchemy import text

from service.extensions import db


@dataclass(frozen=True)
class Failure:
    """A processor's verdict on one ID; `retry` False means no further attempt."""

    message: str
    retry: bool = True


def per_id(function: Callable) -> Callable:
    """Mark a processor that takes one ID (and its key) a call and may run concurrently."""
    function.per_id = True
    return function


def load_processor(path: str) -> Callable:
    module_name, _, function = path.partition(":")
    return getattr(import_module(module_name), function)


def is_per_id(processor: Callable) -> bool:
    return getattr(processor, "per_id", False)


@functools.cache  # asked once per group of IDs; a signature is slow to read
def takes_keys(processor: Callable) -> bool:
    return "keys" in inspect.signature(processor).parameters


def as_failure(verdict) -> Failure | None:
    """A processor's answer for one ID as a Failure, or None when it succeeded."""
    if verdict is None or isinstance(verdict, Failure):
        return verdict
    return Failure(str(verdict))


# Answers worth another attempt: the resource is busy or broken, not the request.
RETRYABLE_HTTP = {408, 425, 429}


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


@per_id
def http_request(user_id: int, key: str) -> Failure | None:
    """One HTTP request to PROCESSOR_HTTP_URL, `{id}` replaced by the ID.

    It carries the ID's `Idempotency-Key` (its task and position, the same on every
    attempt), so a downstream that deduplicates by key knows a repeated call. 2xx is
    done. 429, 408, 425, 5xx, timeouts and connection errors are retried; any other
    answer fails the ID for good.
    """
    config = current_app.config
    template = config["PROCESSOR_HTTP_URL"]
    if not template:
        return Failure("PROCESSOR_HTTP_URL is not set", retry=False)
    url = template.replace("{id}", str(user_id))
    try:
        answer = _client().request(
            config["PROCESSOR_HTTP_METHOD"], url, headers={"Idempotency-Key": key}
        )
    except httpx.TimeoutException:
        return Failure(f"timed out calling {url}")
    except httpx.HTTPError as exc:
        return Failure(f"{type(exc).__name__} calling {url}: {exc}")
    if answer.is_success:
        return None
    retry = answer.status_code in RETRYABLE_HTTP or answer.status_code >= 500
    return Failure(f"HTTP {answer.status_code} from {url}", retry=retry)


_clients: dict[tuple, httpx.Client] = {}
_clients_lock = threading.Lock()


def _client() -> httpx.Client:
    """One pooled client per process and settings (a forked job must not share its
    parent's sockets), holding up to PROCESSOR_CONCURRENCY keep-alive connections."""
    config = current_app.config
    size = config["PROCESSOR_CONCURRENCY"]
    authorization = config["PROCESSOR_HTTP_AUTHORIZATION"]
    timeout = config["PROCESSOR_HTTP_TIMEOUT"]
    key = (os.getpid(), size, authorization, timeout)
    with _clients_lock:
        if key not in _clients:
            _clients[key] = httpx.Client(
                headers={"Authorization": authorization} if authorization else {},
                timeout=timeout,
                limits=httpx.Limits(max_connections=size, max_keepalive_connections=size),
            )
        return _clients[key]
