"""Readiness: whether this process can serve, for load balancers and orchestrators.

Each check has its own connection with short timeouts, so a server that hangs makes the
probe answer "not ready" in a few seconds instead of hanging with it (the app's own
connections wait as long as their work needs).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

import psycopg
from alembic.script import ScriptDirectory
from flask import current_app
from redis.exceptions import RedisError
from sqlalchemy.engine import make_url

from service.core.extensions import probe_redis
from service.limits import held

log = logging.getLogger(__name__)

CHECK_TIMEOUT_SECONDS = 2
# The destinations check names at most this many held limits.
HELD_NAMED = 10


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str  # how long it took, or why it failed


@dataclass(frozen=True)
class Readiness:
    checks: dict[str, Check]

    @property
    def failed(self) -> dict[str, str]:
        """Why each failed check failed; empty when the process is ready."""
        return {name: check.detail for name, check in self.checks.items() if not check.ok}


def readiness() -> Readiness:
    """PostgreSQL answers, its schema is at the migrations' head, Redis answers; and,
    as a report that never makes the process not ready, the limits held because their
    destination is not allowed here."""
    started = time.perf_counter()
    try:
        applied = applied_revisions()
    except psycopg.Error as error:
        database = Check(False, _reason(error))
        schema = Check(False, "not checked: PostgreSQL did not answer")
        destinations = Check(True, "not checked: PostgreSQL did not answer")
    else:
        database = Check(True, f"answered in {_ms_since(started)} ms")
        heads = migration_heads(current_app.extensions["migrate"].directory)
        schema = _schema_check(applied, heads)
        destinations = _destinations_check()
    return Readiness(
        {
            "database": database,
            "migrations": schema,
            "redis": _redis_check(),
            "destinations": destinations,
        }
    )


@contextmanager
def _probe_connection() -> Iterator[psycopg.Connection]:
    """A connection of the probe's own, with short timeouts."""
    # libpq's own URL, not SQLAlchemy's with its driver name.
    url = make_url(current_app.config["SQLALCHEMY_DATABASE_URI"]).set(drivername="postgresql")
    with psycopg.connect(
        url.render_as_string(hide_password=False),
        connect_timeout=CHECK_TIMEOUT_SECONDS,
        autocommit=True,
    ) as connection:
        connection.execute(f"SET statement_timeout = {CHECK_TIMEOUT_SECONDS * 1000}")
        yield connection


def applied_revisions() -> set[str]:
    """The revisions Alembic recorded in the database (none before the first upgrade)."""
    with _probe_connection() as connection:
        try:
            rows = connection.execute("SELECT version_num FROM alembic_version").fetchall()
        except psycopg.errors.UndefinedTable:
            return set()
    return {revision for (revision,) in rows}


def _destinations_check() -> Check:
    """Always ok: a held limit waits, it does not stop the service. Names the held
    limits (public: never their URLs or why), HELD_NAMED at most."""
    try:
        with _probe_connection() as connection:
            rows = connection.execute("SELECT name, processor, options FROM limits").fetchall()
    except psycopg.Error as error:
        return Check(True, f"not checked: {_reason(error)}")
    names = sorted(name for name, processor, options in rows if held.reason(processor, options))
    if not names:
        return Check(True, "no limit held")
    shown = ", ".join(names[:HELD_NAMED])
    more = f" and {len(names) - HELD_NAMED} more" if len(names) > HELD_NAMED else ""
    return Check(
        True,
        f"held, their destination not allowed here (see GET /limits/<name>/): {shown}{more}",
    )


@cache
def migration_heads(directory: str) -> frozenset[str]:
    """The head revisions of the migrations this code carries (read once per process)."""
    return frozenset(ScriptDirectory(directory).get_heads())


def _schema_check(applied: set[str], heads: frozenset[str]) -> Check:
    if applied == heads:
        return Check(True, f"at head {', '.join(sorted(heads))}")
    at = ", ".join(sorted(applied)) or "no revision"
    return Check(
        False, f"database at {at}, code at {', '.join(sorted(heads))}: run flask db upgrade"
    )


def _redis_check() -> Check:
    started = time.perf_counter()
    try:
        with probe_redis(CHECK_TIMEOUT_SECONDS) as redis:
            redis.ping()
    except RedisError as error:
        return Check(False, _reason(error))
    return Check(True, f"answered in {_ms_since(started)} ms")


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


def _reason(error: Exception) -> str:
    """What a probe answers: the kind of failure, never the driver's message, which names
    hosts, users and databases; the log keeps that for the operator."""
    first_line = next(iter(str(error).strip().splitlines()), "")
    log.warning("readiness check failed: %s: %s", type(error).__name__, first_line)
    happened = "timeout, no answer in time" if "timeout" in first_line.lower() else "no answer"
    return f"{type(error).__name__}: {happened} (the log says more)"
