"""Extensions, created unbound here and bound to the app in create_app: the database,
the migrations and the Redis clients. The API's own (flask-smorest) is the web layer's."""

from functools import partial

from flask import current_app, has_request_context
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from redis import Redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry
from sqlalchemy import MetaData, event
from sqlalchemy.exc import InvalidatePoolError

# Stable constraint names keep Alembic revisions reproducible.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

db = SQLAlchemy(metadata=MetaData(naming_convention=NAMING_CONVENTION))
migrate = Migrate()


def init_db(app) -> None:
    db.init_app(app)
    with app.app_context():
        engine = db.engine
    event.listen(engine, "checkout", partial(_ping_outside_requests, engine.dialect))


def _ping_outside_requests(dialect, dbapi_connection, record, proxy) -> None:
    """Check a pooled connection before a job, the scheduler or a command uses it.

    Their pools live long and nobody retries for them, so a connection that died while
    pooled (PostgreSQL restarted) is replaced first, and with it every older one. A
    request skips this round trip: a dead connection fails it with a 503 (see
    service/web/errors.py), which invalidates the pool the same way, and the client retries.
    """
    if has_request_context():
        return
    try:
        dialect.do_ping(dbapi_connection)
    except dialect.loaded_dbapi.Error as error:
        raise InvalidatePoolError() from error


def init_redis(app) -> None:
    # Lazy: redis-py connects on first command, so nothing touches the network here.
    # Every command gives up after REDIS_TIMEOUT_SECONDS: a Redis that answers nobody
    # (paused, failing over) must not hang a request or a slot job.
    # A dropped connection is tried once more at once; a timeout is not tried again
    # (redis-py's default would try three more times, a request then waiting 20 s).
    timeout = app.config["REDIS_TIMEOUT_SECONDS"]
    app.extensions["redis"] = Redis.from_url(
        app.config["REDIS_URL"],
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), retries=1, supported_errors=(RedisConnectionError,)),
    )


def worker_redis() -> Redis:
    """A client of its own for RQ's work loop: RQ raises its socket timeout above its
    blocking dequeue's, which the app's client, shared with the jobs, must not get."""
    return Redis.from_url(
        current_app.config["REDIS_URL"],
        socket_connect_timeout=current_app.config["REDIS_TIMEOUT_SECONDS"],
    )


def get_redis() -> Redis:
    return current_app.extensions["redis"]


def probe_redis(timeout: float) -> Redis:
    """A client of its own that gives up after `timeout` seconds, for probes that must
    answer even while Redis hangs; close it after use (`with`)."""
    return Redis.from_url(
        current_app.config["REDIS_URL"], socket_timeout=timeout, socket_connect_timeout=timeout
    )


def raw_connection():
    """The psycopg connection under the session, in the session's transaction (for COPY)."""
    return db.session.connection().connection.driver_connection
