"""`make run` for real: embedded servers, the API on a port, and a clean stop."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from redis import Redis

from service.core.config import with_stack_addresses

from ..helpers import parse_metrics, requests_counted
from ..processes import ROOT, free_port, run_flask, wait_for_http

pytestmark = pytest.mark.slow


def request(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as answer:
        return json.load(answer)


def wait_for_root(base: str, make: subprocess.Popen, timeout: float = 120) -> dict:
    return json.loads(wait_for_http(base + "/", make, timeout))


def wait_for_status(url: str, status: str, timeout: float = 60) -> int:
    """Poll a task until it reaches `status`; return its done count."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = request(url)
        if task["status"] == status:
            return task["done"]
        time.sleep(0.3)
    raise AssertionError(f"the task stayed {task['status']}")


def start(var_dir: Path, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    # Two-second slots, so that a task runs through within the test.
    env.update(
        VAR_DIR=str(var_dir),
        PORT=str(port),
        SLOT_SECONDS="2",
        WINDOW_SLOTS="5",
        PLAN_LEAD_SECONDS="0.5",
    )
    return subprocess.Popen(["make", "--no-print-directory", "run"], cwd=ROOT, env=env)


def stop(make: subprocess.Popen) -> dict[int, str]:
    """SIGTERM to make, as a service manager sends; returns what it had started."""
    started = {p.pid: " ".join(p.cmdline()) for p in psutil.Process(make.pid).children(True)}
    make.send_signal(signal.SIGTERM)
    # make waits for its child to finish, then ends itself by the same signal.
    assert make.wait(60) in (0, -signal.SIGTERM)
    return started


def flask_command(var_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """An operator's `flask ...` in the project folder, with no server address set."""
    return run_flask(*args, unset=("DATABASE_URL", "REDIS_URL"), VAR_DIR=var_dir)


def stack_redis(var_dir: Path) -> Redis:
    return Redis.from_url(with_stack_addresses({"VAR_DIR": str(var_dir)})["REDIS_URL"])


def test_make_run_serves_the_stack_on_embedded_servers_and_stops_it_all(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    make = start(tmp_path, port)
    try:
        root = wait_for_root(base, make)
        assert root["users"] == base + "/users/"
        request(base + "/users/", {"id": 5, "name": "kept"})
        task = request(base + "/celery_ids_tasks/", {"task_name": "run", "payload": "7,8,9"})
        assert task["message"] == "Task added to queue"
        assert wait_for_status(base + f"/celery_ids_tasks/{task['task_id']}/", "done") == 3
        users = {user["id"]: user for user in request(base + "/users/")}
        assert all(users[i]["times_processed"] == 1 for i in (7, 8, 9))
        shown = flask_command(tmp_path, "settings", "show")
        assert shown.returncode == 0, shown.stderr
        assert "SLOT_SECONDS=2" in shown.stdout.splitlines()
        stack_redis(tmp_path).set("kept", "yes")
        assert request(base + "/readyz")["status"] == "ok"
        with urllib.request.urlopen(base + "/metrics", timeout=10) as answer:
            figures = parse_metrics(answer.read().decode())
        assert figures[("slotted_ids", (("limit", "default"), ("status", "done")))] == 3
        # Polled until done, by whichever of gunicorn's two workers: counted in one sum.
        polled = requests_counted(figures, "GET", "/celery_ids_tasks/<id:task_id>/", 200)
        assert polled >= 1
        started = stop(make)
    finally:
        if make.poll() is None:
            make.kill()
    commands = " ".join(started.values())
    for part in (
        "gunicorn",
        "flask --app wsgi worker",
        "flask --app wsgi worker --queue planning",
        "flask --app wsgi scheduler",
        "redis-server",
    ):
        assert part in commands
    alive = [command for pid, command in started.items() if psutil.pid_exists(pid)]
    assert not alive, f"still running after the stop: {alive}"
    assert not (tmp_path / "postgres" / "postmaster.pid").exists()
    unreachable = flask_command(tmp_path, "settings", "show")
    assert unreachable.returncode == 1
    assert unreachable.stderr.strip() == "Error: DATABASE_URL is required"

    # A second run reuses the data of the first, in both servers.
    make = start(tmp_path, port)
    try:
        wait_for_root(base, make)
        assert request(base + "/users/5/")["name"] == "kept"
        assert stack_redis(tmp_path).get("kept") == b"yes"
        stop(make)
    finally:
        if make.poll() is None:
            make.kill()


def test_the_stack_starts_without_a_warning_about_xdg_runtime_dir():
    # pgserver's import warns on machines without XDG_RUNTIME_DIR; `make run` says
    # nothing about a folder it does not need.
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    imported = subprocess.run(
        [
            sys.executable,
            "-W",
            "error:XDG_RUNTIME_DIR is not set",
            "-c",
            "import service.ops.devstack",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert imported.returncode == 0, imported.stderr
    assert "XDG_RUNTIME_DIR" not in imported.stderr


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql://app:s3cret@db.internal:5432/slotted",
            "postgresql://app:***@db.internal:5432/slotted",
        ),
        ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("postgresql://postgres@127.0.0.1:5432/test", "postgresql://postgres@127.0.0.1:5432/test"),
    ],
)
def test_make_run_logs_server_addresses_without_their_passwords(url, shown):
    from service.ops import devstack

    assert devstack.without_password(url) == shown


def test_without_a_token_make_run_opens_the_api_to_this_machine_only():
    from service.ops import devstack

    assert devstack.open_only_to_this_machine({}, "127.0.0.1") == {
        "ALLOWED_HOSTS": "127.0.0.1,localhost,::1"
    }
    assert devstack.open_only_to_this_machine({"ALLOWED_HOSTS": "box"}, "localhost") == {}
    token = {"API_TOKEN": "a-token-of-16-chars"}
    assert devstack.open_only_to_this_machine(token, "0.0.0.0") == {}
    with pytest.raises(SystemExit, match="HOST=0.0.0.0 without API_TOKEN"):
        devstack.open_only_to_this_machine({}, "0.0.0.0")
