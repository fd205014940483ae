"""Processors: what is done with each ID when its slot comes (config ID_PROCESSOR).

A processor takes a list of user IDs and returns the ones that failed, as a mapping
from ID to a `Failure` (or an error text, retried). It runs inside the transaction that
records the outcomes: what it writes to the database commits with them, or not at all.
An exception fails every ID of the call.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections import Counter

from flask import current_app
from sqlalchemy import text

from service.dispatch import Failure
from service.extensions import db

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


def http_request(user_ids: list[int], keys: list[str] | None = None) -> dict[int, Failure]:
    """One HTTP request per ID to PROCESSOR_HTTP_URL, `{id}` replaced by the ID.

    Each carries the ID's `Idempotency-Key` (its task and position, the same on every
    attempt), so a downstream that deduplicates by key knows a repeated call. 2xx is
    done. 429, 408, 5xx, timeouts and connection errors are retried; any other answer
    fails the ID for good.
    """
    config = current_app.config
    template = config["PROCESSOR_HTTP_URL"]
    if not template:
        return {
            user_id: Failure("PROCESSOR_HTTP_URL is not set", retry=False) for user_id in user_ids
        }
    failures = {}
    for user_id, key in zip(user_ids, keys or [None] * len(user_ids)):
        failure = _request(
            template.replace("{id}", str(user_id)),
            config["PROCESSOR_HTTP_METHOD"],
            config["PROCESSOR_HTTP_TIMEOUT"],
            key,
        )
        if failure:
            failures[user_id] = failure
    return failures


def _request(url: str, method: str, timeout: float, key: str | None) -> Failure | None:
    headers = {"Idempotency-Key": key} if key else {}
    request = urllib.request.Request(
        url, method=method, data=b"" if method != "GET" else None, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return None
    except urllib.error.HTTPError as answer:
        retry = answer.code in RETRYABLE_HTTP or answer.code >= 500
        return Failure(f"HTTP {answer.code} from {url}", retry=retry)
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return Failure(f"{type(reason).__name__} calling {url}: {reason}")
