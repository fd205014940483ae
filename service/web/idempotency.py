"""Idempotency-Key on a POST: a request sent again gets the first answer, and does nothing.

A request with a key holds a transaction-level advisory lock on it until its answer is
recorded: a second request with the same key waits for the first, then replays its
answer. The lock is held on a connection of its own, because the request's session
commits its work before the answer is known, and that commit would release it. The key's
row is written in the request's own transaction, so it commits together with what the
request did or not at all: a request that failed (an error answer, a transaction rolled
back) leaves no key behind, and may be corrected and sent again with the same key.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import timedelta
from functools import wraps
from typing import BinaryIO

from flask import Response, current_app, request
from sqlalchemy import delete, func, insert, select, text, update
from werkzeug.exceptions import BadRequest, Conflict, UnprocessableEntity

from service.core import locks
from service.core.extensions import db
from service.core.models import IdempotencyKey

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
KEY_FORMAT = re.compile(r"[\x20-\x7e]{1,255}")
_READ_SIZE = 1 << 16

# The contract in the OpenAPI document of each view that is decorated.
OPENAPI_PARAMETER = {
    "in": "header",
    "name": HEADER,
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[ -~]+$"},
    "description": (
        "Optional; 1 to 255 printable ASCII characters, else 400. The same key with the "
        "same request (method, path, query and body) within IDEMPOTENCY_KEY_HOURS (24 h) "
        f"answers the first answer again, with `{REPLAYED_HEADER}: true`, and does "
        "nothing; a second request waits for the first to finish. The same key with "
        "another request answers 422. An error answer keeps no key."
    ),
}
OPENAPI_RESPONSE_HEADERS = {
    REPLAYED_HEADER: {
        "description": f"`true` on a repeat: the first answer to the same {HEADER}",
        "schema": {"type": "string", "enum": ["true"]},
    }
}


def idempotent(view):
    """Decorate a view that answers a POST (with a Response, or by raising): once per key."""

    @wraps(view)
    def wrapper(*args, **kwargs):
        key = request.headers.get(HEADER)
        if key is None:
            return view(*args, **kwargs)
        if not KEY_FORMAT.fullmatch(key):
            raise BadRequest(f"{HEADER} must be 1 to 255 printable ASCII characters")
        body = _HashedBody.install()
        with db.engine.connect() as lock:
            lock.execute(
                text("SELECT pg_advisory_xact_lock(:namespace, :key)"),
                {"namespace": locks.IDEMPOTENCY_KEY, "key": locks.idempotency_key(key)},
            )
            known = lock.execute(select(IdempotencyKey).where(IdempotencyKey.key == key)).first()
            if known is not None:
                return _replay(known, body)
            return _answer_once(key, body, view, args, kwargs)

    return wrapper


def _answer_once(key: str, body: _HashedBody, view, args, kwargs) -> Response:
    db.session.execute(insert(IdempotencyKey).values(key=key))
    try:
        response = view(*args, **kwargs)
    except BaseException:
        # Before the key's lock is released: the next request with it must not see this one.
        db.session.rollback()
        raise
    db.session.execute(
        update(IdempotencyKey)
        .where(IdempotencyKey.key == key)
        .values(
            request_hash=body.hexdigest(),
            status_code=response.status_code,
            content_type=response.content_type,
            body=response.get_data(),
        )
    )
    db.session.commit()
    return response


def _replay(known, body: _HashedBody) -> Response:
    if known.status_code is None:
        # Only a process that died between the request's commit and this record leaves it.
        raise Conflict(
            f"a request with this {HEADER} was carried out, but its answer was lost; "
            "read its result from the collection"
        )
    if known.request_hash != body.hexdigest():
        raise UnprocessableEntity(
            f"this {HEADER} was used for another request (method, path, query or body "
            "differ); use a new key for a new request"
        )
    return Response(
        known.body,
        status=known.status_code,
        content_type=known.content_type,
        headers={REPLAYED_HEADER: "true"},
    )


class _HashedBody:
    """The request's body, hashed with its method, path and query as the view reads it,
    so that a body streamed into the database is still read only once."""

    def __init__(self, stream: BinaryIO):
        self._stream = stream
        head = [request.method, request.path, request.query_string.decode("latin-1")]
        self._digest = hashlib.sha256(json.dumps(head).encode() + b"\n")

    @classmethod
    def install(cls) -> _HashedBody:
        # The body's size limit must be set by now: the stream takes it when it is opened.
        request.stream = body = cls(request.stream)
        return body

    def read(self, size: int = -1) -> bytes:
        block = self._stream.read(size)
        self._digest.update(block)
        return block

    def hexdigest(self) -> str:
        """The request's hash, once what the view left unread has been read too."""
        while self.read(_READ_SIZE):
            pass
        return self._digest.hexdigest()


def delete_expired() -> int:
    """Delete the keys older than IDEMPOTENCY_KEY_HOURS; return how many went."""
    age = timedelta(hours=current_app.config["IDEMPOTENCY_KEY_HOURS"])
    deleted = db.session.execute(
        delete(IdempotencyKey).where(IdempotencyKey.created_at < func.now() - age)
    ).rowcount
    db.session.commit()
    return deleted
