"""Real service processes for the tests: start, stop, kill, and wait for an outcome."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

from service.core.extensions import db

ROOT = Path(__file__).resolve().parent.parent


def _env(settings: dict) -> dict[str, str]:
    return {**os.environ, **{name: str(value) for name, value in settings.items()}}


def start(command: list[str], settings: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "wsgi", *command],
        cwd=ROOT,
        env=_env(settings),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def run_flask(*args: str, unset: tuple[str, ...] = (), **settings) -> subprocess.CompletedProcess:
    """A `flask ...` command run to its end, as an operator runs it in the project folder."""
    env = _env(settings)
    for name in unset:
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def run_python(arguments: list[str], settings: dict) -> subprocess.CompletedProcess:
    """`python ARGUMENTS` in the repository, run to its end; a failure fails the test."""
    finished = subprocess.run(
        [sys.executable, *arguments],
        cwd=ROOT,
        env=_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert finished.returncode == 0, finished.stderr
    return finished


def kill_hard(process: subprocess.Popen) -> None:
    """kill -9 the process and the work horse it forked, as a machine failure would."""
    family = [process.pid, *(child.pid for child in psutil.Process(process.pid).children(True))]
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()


def stop(processes) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            kill_hard(process)


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        db.session.remove()
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, server: subprocess.Popen, timeout: float) -> bytes:
    """Ask `url` until it answers; fail at once if `server`, which should answer it, ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, f"{server.args} exited before serving"
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                return answer.read()
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer in time")
