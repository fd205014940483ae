"""One error shape for every failure: flask-smorest's code, status, message, errors."""

from __future__ import annotations

from flask import request
from psycopg.errors import DeadlockDetected, SerializationFailure
from redis.exceptions import RedisError, ResponseError
from rq.exceptions import NoSuchJobError
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError
from werkzeug.exceptions import (
    BadRequest,
    Conflict,
    HTTPException,
    NotFound,
    ServiceUnavailable,
    UnprocessableEntity,
)

from .ids import InvalidIds
from .outages import is_outage


def not_found(what: str, ident) -> NotFound:
    return NotFound(f"{what} {ident} does not exist")


# What each uniqueness constraint means to a client.
CONFLICT_MESSAGES = {
    "pk_users": "a user with this id already exists",
    "uq_limits_name": "a limit with this name already exists",
}


def conflict_message(error: IntegrityError) -> str:
    """What a uniqueness constraint's refusal means to a client."""
    constraint = getattr(getattr(error.orig, "diag", None), "constraint_name", None)
    return CONFLICT_MESSAGES.get(constraint, f"conflicts with an existing record ({constraint})")


def init_app(app, api) -> None:
    """Map refusals raised below the views to 4xx; the session rolls back at teardown."""

    def integrity_error(error: IntegrityError):
        return api.handle_http_exception(Conflict(conflict_message(error)))

    def data_error(error: DataError):
        return api.handle_http_exception(BadRequest("a value in the request is out of range"))

    def unavailable(error: DBAPIError):
        reason = _retry_reason(error)
        if reason is None:
            raise error
        response = ServiceUnavailable(reason)
        return api.handle_http_exception(with_errors(response, {}, headers={"Retry-After": "1"}))

    def redis_unavailable(error: RedisError):
        # Redis away or answering nobody (paused, failing over): the request may simply
        # be sent again. A refused command (ResponseError) is handled apart; any other
        # Redis error is a bug.
        if not is_outage(error):
            raise error
        response = ServiceUnavailable("the queue server could not be reached; retry")
        return api.handle_http_exception(with_errors(response, {}, headers={"Retry-After": "1"}))

    def invalid_ids(error: InvalidIds):
        # Raised while a text body streams into the database, after parsing began.
        return api.handle_http_exception(
            with_errors(
                UnprocessableEntity("some IDs in the body are invalid"),
                {"body": {str(index): [message] for index, message in error.errors.items()}},
            )
        )

    def dashboard_refusal(error: Exception):
        # rq-dashboard lets a wrong instance number, job id or page size raise (the last
        # one from Redis itself); there they are the client's mistakes. Anywhere else
        # they are bugs, and stay 500s.
        if request.blueprint != "rq_dashboard":
            raise error
        missing = isinstance(error, LookupError | NoSuchJobError)
        return api.handle_http_exception((NotFound if missing else BadRequest)(str(error)))

    app.register_error_handler(IntegrityError, integrity_error)
    app.register_error_handler(DataError, data_error)
    app.register_error_handler(DBAPIError, unavailable)
    app.register_error_handler(RedisError, redis_unavailable)
    app.register_error_handler(InvalidIds, invalid_ids)
    for kind in (LookupError, NoSuchJobError, ValueError, ResponseError):
        app.register_error_handler(kind, dashboard_refusal)


def _retry_reason(error: DBAPIError) -> str | None:
    """Why the same request may simply be sent again, when it may."""
    if isinstance(error.orig, DeadlockDetected | SerializationFailure):
        # PostgreSQL broke a lock cycle (or lost a serialization race) by aborting this
        # request; nothing of it was stored.
        return "the database was busy with a conflicting change; retry"
    # A connection that died in the pool (PostgreSQL restarted, or a backend killed)
    # fails the one request that used it; SQLAlchemy then drops it and every older one
    # in the pool, so the retry gets a fresh connection.
    if is_outage(error):
        return "the connection to the database was lost or could not be made; retry"
    return None


def with_errors(error: HTTPException, errors: dict, headers: dict | None = None):
    error.data = {"message": error.description, "headers": headers or {}}
    if errors:
        error.data["errors"] = errors
    return error
