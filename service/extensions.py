"""Extensions, created unbound here and bound to the app in create_app."""

from flask import current_app
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from redis import Redis
from sqlalchemy import MetaData

from .api.base import ServiceApi

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
api = ServiceApi()


def init_redis(app) -> None:
    # Lazy: redis-py connects on first command, so nothing touches the network here.
    app.extensions["redis"] = Redis.from_url(app.config["REDIS_URL"])


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
