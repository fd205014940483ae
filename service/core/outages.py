"""Riding out a server's absence: which errors mean PostgreSQL or Redis is away, a capped
backoff, and the loop that keeps a long-running process (a worker, the scheduler) going.

A server may stop, restart, fail over or hang for any length of time; none of that is a
reason for a process of the service to exit. Each failure is logged in one line (a
traceback a second says nothing more), the broken session is thrown away, and the
process tries again after a wait that doubles up to a cap.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from psycopg import Error as DriverError
from psycopg import InterfaceError, OperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DBAPIError, PendingRollbackError

from service.core.extensions import db

log = logging.getLogger(__name__)

FIRST_WAIT_SECONDS = 1.0
LONGEST_WAIT_SECONDS = 30.0
# A run that lasted this long was healthy: the next failure starts the backoff afresh.
HEALTHY_AFTER_SECONDS = 60.0
# A stop request is seen within this while waiting.
WAIT_SLICE_SECONDS = 0.2


def is_outage(error: BaseException) -> bool:
    """Whether an error says a server is away, failing over or a connection broke, not
    that a statement or a command was wrong."""
    if isinstance(error, RedisError):
        return _redis_says_away(error)
    if isinstance(error, PendingRollbackError):  # an earlier statement lost its connection
        return True
    if isinstance(error, DBAPIError):
        return error.connection_invalidated or _driver_says_connection(error.orig)
    return _driver_says_connection(error)


def is_database_outage(error: BaseException) -> bool:
    return is_outage(error) and not isinstance(error, RedisError)


READ_ONLY_TRANSACTION = "25006"
# Answers of a Redis that is loading, failing over, or a replica for now.
REDIS_AWAY_ANSWERS = ("LOADING", "BUSY", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN")


def _redis_says_away(error: RedisError) -> bool:
    if isinstance(error, RedisConnectionError | RedisTimeoutError):
        return True
    # Redis answered, and refused: a wrong command is a bug, not an outage.
    return isinstance(error, ResponseError) and str(error).startswith(REDIS_AWAY_ANSWERS)


def _driver_says_connection(error: BaseException | None) -> bool:
    if not isinstance(error, DriverError):
        return False
    if isinstance(error, InterfaceError):
        return True
    state = getattr(error, "sqlstate", None)
    if state == READ_ONLY_TRANSACTION:  # a primary just demoted by a failover
        return True
    # No SQLSTATE: the driver's own error about the connection. 08: connection
    # exceptions. 57P0x: the server shutting down, crashed, or starting up.
    return isinstance(error, OperationalError) and (
        state is None or state.startswith(("08", "57P"))
    )


LOCK_NOT_AVAILABLE = "55P03"


def lock_not_granted(error: BaseException | None) -> bool:
    """Whether a statement gave up waiting for a lock (lock_timeout), however wrapped."""
    while error is not None:
        if getattr(error, "sqlstate", None) == LOCK_NOT_AVAILABLE:
            return True
        error = getattr(error, "orig", None) or error.__cause__
    return False


def describe(error: BaseException) -> str:
    """An error in one short line, for a log line that says why a server is away."""
    text = str(getattr(error, "orig", None) or error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def forget_session() -> None:
    """Throw away the session and its connection, whatever state a broken server left
    them in; the next use takes a fresh connection from the pool."""
    try:
        db.session.remove()
    except Exception as error:  # its connection is dead: nothing left to roll back
        log.debug("session dropped: %s", describe(error))


@dataclass
class Backoff:
    """Waits that double from `first` up to `most`."""

    first: float = FIRST_WAIT_SECONDS
    most: float = LONGEST_WAIT_SECONDS
    current: float = field(init=False)

    def __post_init__(self) -> None:
        self.current = self.first

    def next(self) -> float:
        wait, self.current = self.current, min(self.current * 2, self.most)
        return wait

    def reset(self) -> None:
        self.current = self.first


def sleep_unless(seconds: float, stopping: Callable[[], bool]) -> None:
    deadline = time.monotonic() + seconds
    while not stopping() and (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, WAIT_SLICE_SECONDS))


def keep_running(
    run: Callable[[], bool],
    what: str,
    stopping: Callable[[], bool] = lambda: False,
    backoff: Backoff | None = None,
) -> None:
    """Call `run` again and again until it returns True (its process is done) or
    `stopping` says so; each failed run is logged in one line (a traceback for anything
    but an outage) and followed by a wait that doubles up to a cap."""
    backoff = backoff or Backoff()
    while not stopping():
        started = time.monotonic()
        try:
            if run():
                return
            reason = "its loop ended"
        except Exception as error:
            if stopping():  # a stop request raised inside the run
                return
            reason = describe(error)
            if not is_outage(error):
                log.exception("%s failed", what)
        forget_session()
        if stopping():
            return
        if time.monotonic() - started > HEALTHY_AFTER_SECONDS:
            backoff.reset()
        wait = backoff.next()
        log.warning("%s stopped (%s); starting again in %.0f s", what, reason, wait)
        sleep_unless(wait, stopping)


def wait_for_servers(
    attempt: Callable[[], object],
    what: str,
    stopping: Callable[[], bool] = lambda: False,
    backoff: Backoff | None = None,
    also_retry: tuple[type[Exception], ...] = (),
):
    """Return what `attempt` returns once it succeeds, trying again after each outage
    error (or one of `also_retry`) with a capped backoff; any other error, or any error
    once `stopping` says so, is raised."""
    backoff = backoff or Backoff()
    while True:
        try:
            return attempt()
        except Exception as error:
            if not (is_outage(error) or isinstance(error, also_retry)) or stopping():
                raise
            forget_session()
            wait = backoff.next()
            log.warning("%s: %s; trying again in %.0f s", what, describe(error), wait)
            sleep_unless(wait, stopping)


class OneLineOutages(logging.Filter):
    """RQ and rq-scheduler log a traceback when their loops meet an error; for a server
    that is away, one line says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] and is_outage(record.exc_info[1]):
            record.msg = f"{record.getMessage()} ({describe(record.exc_info[1])})"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_library_tracebacks() -> None:
    for name in ("rq.worker", "rq_scheduler.scheduler"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, OneLineOutages) for f in logger.filters):
            logger.addFilter(OneLineOutages())
