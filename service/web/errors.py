"""One error shape for every failure (flask-smorest's code, status, message, errors),
and the one place where domain errors and server outages become HTTP answers."""

from __future__ import annotations

import logging

from flask import request
from psycopg.errors import DeadlockDetected, SerializationFailure
from redis.exceptions import RedisError, ResponseError
from rq.exceptions import NoSuchJobError
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError
from werkzeug.exceptions import (
    BadRequest,
    Conflict,
    Gone,
    HTTPException,
    MethodNotAllowed,
    NotFound,
    RequestEntityTooLarge,
    ServiceUnavailable,
    UnprocessableEntity,
)

from service.core import errors as domain
from service.core.outages import is_outage
from service.tasks.ids import InvalidIds, how_many_invalid

log = logging.getLogger(__name__)

# Each domain error's answer; the first kind that matches wins (TooLarge is a Refused).
HTTP_ANSWERS = (
    (domain.NotFound, NotFound),
    (domain.Conflict, Conflict),
    (domain.Gone, Gone),
    (domain.TooLarge, RequestEntityTooLarge),
    (domain.Refused, UnprocessableEntity),
)
DASHBOARD = "rq_dashboard"


def http_error(error: domain.DomainError) -> HTTPException:
    answer = next(http for kind, http in HTTP_ANSWERS if isinstance(error, kind))
    return with_errors(answer(error.message), error.errors)


def init_app(app, api) -> None:
    """Map refusals raised below the views to 4xx; the session rolls back at teardown."""

    def domain_error(error: domain.DomainError):
        return api.handle_http_exception(http_error(error))

    def integrity_error(error: IntegrityError):
        conflict = domain.unique_violation(error)
        if conflict is None:
            # A NOT NULL or foreign key refused: the code wrote something it must not.
            log.error("integrity error that is not a duplicate: %s", error.orig)
            raise error
        return domain_error(conflict)

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
        # be sent again. Any other Redis error is a bug (or, in rq-dashboard, see below).
        if not is_outage(error):
            raise error
        response = ServiceUnavailable("the queue server could not be reached; retry")
        return api.handle_http_exception(with_errors(response, {}, headers={"Retry-After": "1"}))

    def invalid_ids(error: InvalidIds):
        # Raised while a text body streams into the database, after parsing began; the
        # answer is the one a JSON list of the same IDs gets.
        errors = {"ids": error.details()}
        return api.handle_http_exception(with_errors(UnprocessableEntity(summary(errors)), errors))

    def dashboard_refusal(error: Exception):
        # rq-dashboard lets a wrong instance number, job id or page size raise (the last
        # one from Redis itself): there they are the client's mistakes.
        if isinstance(error, RedisError) and is_outage(error):
            return redis_unavailable(error)
        missing = isinstance(error, LookupError | NoSuchJobError)
        return api.handle_http_exception((NotFound if missing else BadRequest)(str(error)))

    app.register_error_handler(domain.DomainError, domain_error)
    app.register_error_handler(IntegrityError, integrity_error)
    app.register_error_handler(DataError, data_error)
    app.register_error_handler(DBAPIError, unavailable)
    app.register_error_handler(RedisError, redis_unavailable)
    app.register_error_handler(InvalidIds, invalid_ids)
    # Scoped to rq-dashboard's blueprint: anywhere else these are bugs, and stay 500s.
    # (Its blueprint object is shared by every app, so the handlers go into this app's
    # own table, under the blueprint's name, rather than onto the blueprint.)
    dashboard = app.error_handler_spec[DASHBOARD][None]
    for kind in (LookupError, NoSuchJobError, ValueError, ResponseError):
        dashboard[kind] = dashboard_refusal


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


def shape(payload: dict, error: HTTPException) -> None:
    """Complete flask-smorest's answer to `error` in the one shape of every error.

    webargs keys the errors of a refused request by where each field was read ("json",
    "query") and then by field; a domain error keys them by field alone. The answer keys
    them by field alone, whatever the location: a client reads errors.task_name
    whether the name came in the body or in the query. `message` says what is wrong in
    words, never the status's generic sentence.
    """
    data = getattr(error, "data", None) or {}
    if "errors" not in data and isinstance(data.get("messages"), dict):
        payload["errors"] = by_field(data["messages"])
    if "message" not in payload:
        errors = payload.get("errors")
        payload["message"] = summary(errors) if errors else _in_words(error)


def _in_words(error: HTTPException) -> str:
    """The error's description, unless it is only werkzeug's sentence for its status."""
    said = _SAID_INSTEAD.get(type(error))
    if said is None or error.description != type(error).description:
        return error.description or error.name
    return said(error)


# What the router and the request's size limit mean, for the request at hand.
_SAID_INSTEAD = {
    NotFound: lambda error: f"there is nothing at {request.path}",
    MethodNotAllowed: lambda error: (
        f"{request.method} is not allowed at {request.path}; "
        f"it takes {', '.join(sorted(error.valid_methods or ()))}"
    ),
    RequestEntityTooLarge: lambda error: (
        f"the body is larger than the {request.max_content_length} bytes this request may have"
    ),
}


# marshmallow's key for an error of the whole body or query rather than of one field.
WHOLE = "_schema"


def by_field(messages: dict) -> dict:
    """webargs' errors by location, then field: by field alone."""
    errors: dict = {}
    for problems in messages.values():
        if isinstance(problems, dict):
            errors.update(problems)
        else:
            errors.setdefault(WHOLE, []).extend(problems)
    return errors


def summary(errors: dict) -> str:
    """What is wrong, in words: each field and its problem, or how many IDs are bad."""
    return "; ".join(_problem(str(field), problem) for field, problem in errors.items())


def _problem(field: str, problem) -> str:
    if isinstance(problem, dict) and "listed" in problem:
        return _bad_ids(field, problem)
    if isinstance(problem, dict):
        return "; ".join(_problem(f"{field}.{key}", inner) for key, inner in problem.items())
    words = " ".join(map(str, problem)) if isinstance(problem, list) else str(problem)
    return words if field == WHOLE else f"{field}: {words}"


def _bad_ids(field: str, details: dict) -> str:
    """The sentence for InvalidIds.details(): how many, and where they are listed."""
    invalid, listed = details["invalid"], len(details["listed"])
    counted = how_many_invalid(invalid, details["submitted"])
    if invalid > listed:
        return f"{counted}: the first {listed} are listed in errors.{field}"
    return f"{counted}: see errors.{field}"


def with_errors(error: HTTPException, errors: dict, headers: dict | None = None):
    error.data = {"message": error.description, "headers": headers or {}}
    if errors:
        error.data["errors"] = errors
    return error
