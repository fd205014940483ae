"""Which PostgreSQL and Redis the tests use: given, local, or embedded."""

from __future__ import annotations

import socket
from pathlib import Path

from service.devstack import EmbeddedPostgres, EmbeddedRedis

LOCAL_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
# A database index of the tests' own, flushed before each test.
LOCAL_REDIS_URL = "redis://127.0.0.1:6379/15"


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def resolve(environ, var_dir: Path) -> tuple[str, str, list]:
    """The two URLs, plus the embedded servers started for them (to stop at the end)."""
    started = []
    database_url = environ.get("TEST_DATABASE_URL")
    if not database_url:
        if _answers(5432):
            database_url = LOCAL_DATABASE_URL
        else:
            started.append(EmbeddedPostgres(var_dir / "postgres"))
            database_url = started[-1].url
    redis_url = environ.get("TEST_REDIS_URL")
    if not redis_url:
        if _answers(6379):
            redis_url = LOCAL_REDIS_URL
        else:
            started.append(EmbeddedRedis(var_dir / "redis"))
            redis_url = started[-1].url + "?db=15"
    return database_url, redis_url, started
