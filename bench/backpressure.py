"""How the service learns a downstream's real rate, run by hand:
`DATABASE_URL=... REDIS_URL=... .venv/bin/python -m bench.backpressure [--exact] [--runs N]`.

It reads DATABASE_URL (plain postgresql://) and REDIS_URL, and empties the tables and
the Redis database they name: give it ones of its own.

The downstream takes 10 calls a second: nginx's own limiter (`limit_req`, rate=10r/s,
burst=4, `nodelay`, 429 with `Retry-After: 1`) in front of a local recorder
(tests/downstream.py), nginx started as a child process with a prefix of its own in a
temporary folder, on a free 127.0.0.1 port. Its access log (`$msec $status
$request_uri $request_time`: when each call came, accepted or refused) is the record
of every call; its error log notes each refusal with nginx's excess. `nodelay`, because a
partner API's limiter answers at once, accepting or refusing; nginx refuses the same
calls with or without it (the excess is counted when a call arrives), and without it
would only hold accepted early calls back, which blurs when they arrived. Without
/usr/sbin/nginx a Python stand-in applies nginx's own arithmetic (a bucket that leaks
`rate` a second and holds `burst` calls beyond the one at hand).

The stack is the real one, as separate processes: `flask db upgrade`, three `flask
worker`s and `flask scheduler`, with 2-s slots in windows of 15, a plan lead of 0.5 s,
reconcile every 2 s, and the default limit calling the downstream through
`workers.processors:http_request` at RPM 40 (40 a 2-s slot, 20 a second: twice what the
downstream takes). 300 IDs are submitted with overflow `defer`.

`--exact`: the downstream takes exactly the limit's rate (rate=20r/s, burst=8), 600
IDs; `--runs N` repeats it. Without `nodelay` here: a downstream that queues a little,
holding an early call back (up to 8 / 20 s) rather than answering it at once; it refuses
the same calls as with `nodelay`.

It prints, per run, a table of its figures beside their aims: IDs refused at least once
and refused calls (per ID submitted), IDs refused more than 10 s after the first
refusal, the time from the first call to the last ID done against the time the
downstream itself needs (IDs / its rate), IDs done and failed (from PostgreSQL), and how
far the task's last slot moved from its place right after planning. The aims: at most
15 % of IDs refused even once, at most 2 % refused more than 10 s after the first
refusal, every ID done and none failed, done within 1.5 times the downstream's own
need; at the exact rate, no refused call. Then the learned rate as polled every 0.5 s
(its changes, times from the first call), the limit's events (when each was re-planned,
how many IDs it moved), the calls accepted/refused per 2 s, and the most calls that came
within one second. Each process's log stays in a temporary folder whose path it prints.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg
from sqlalchemy import text

from service import create_app
from service.core.extensions import db, get_redis
from service.core.models import FINISHED
from service.tasks.services import submit_task
from tests.downstream import Record, Server
from tests.processes import free_port, stop

NGINX = Path("/usr/sbin/nginx")
SLOT_SECONDS = 2
WORKERS = 3
POLL_SECONDS = 0.5
LATE_AFTER_SECONDS = 10.0
SETTINGS = {
    "SLOT_SECONDS": SLOT_SECONDS,
    "WINDOW_SLOTS": 15,
    "PLAN_LEAD_SECONDS": 0.5,
    "RECONCILE_INTERVAL_SECONDS": 2,
    "RPM": 40,
    "ID_PROCESSOR": "workers.processors:http_request",
    "DOWNSTREAM_URLS": "http://127.0.0.1:*/",
    "PROCESSOR_HTTP_TIMEOUT": 10,
}


@dataclass(frozen=True)
class Scenario:
    name: str
    ids: int
    rate: int  # calls a second the downstream takes
    burst: int
    nodelay: bool
    # The aims, as (figure, bound): a share of IDs at most, or a ratio at most.
    aims: dict[str, float] = field(default_factory=dict)

    def needs(self) -> float:
        return self.ids / self.rate


SLOW = Scenario(
    "half the limit's rate",
    ids=300,
    rate=10,
    burst=4,
    nodelay=True,
    aims={"refused_ids": 0.15, "late_ids": 0.02, "ratio": 1.5},
)
EXACT = Scenario(
    "exactly the limit's rate", ids=600, rate=20, burst=8, nodelay=False, aims={"calls": 0}
)


def say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(0.1)
    return value


def listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


# A call as the downstream saw it: when it came, its status, the user ID.
Call = tuple[float, int, int]


class Nginx:
    """nginx's limiter in front of the recorder, on a free loopback port; `calls()`
    reads its access log."""

    CONFIG = """
worker_processes 1;
error_log {dir}/error.log info;
events {{ worker_connections 1024; }}
http {{
    log_format calls '$msec $status $request_uri $request_time';
    access_log {dir}/access.log calls;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    limit_req_zone $binary_remote_addr zone=z:1m rate={rate}r/s;
    limit_req_status 429;
    limit_req_log_level info;
    # Only the refusals say when to come back.
    map $status $retry_after {{ 429 1; default ""; }}
    upstream recorder {{ server 127.0.0.1:{upstream}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            limit_req zone=z burst={burst}{nodelay};
            add_header Retry-After $retry_after always;
            proxy_pass http://recorder;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""

    def __init__(self, scenario: Scenario, folder: Path):
        self.scenario, self.dir = scenario, folder / "nginx"
        self.dir.mkdir()
        self.dir.chmod(0o755)  # nginx's workers run as nobody under root
        self.record = Record()
        self.recorder = Server(self.record)
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> str:
        self.recorder.__enter__()
        config = self.dir / "nginx.conf"
        config.write_text(
            self.CONFIG.format(
                dir=self.dir,
                rate=self.scenario.rate,
                burst=self.scenario.burst,
                nodelay=" nodelay" if self.scenario.nodelay else "",
                upstream=self.recorder.port,
                port=self.port,
            )
        )
        with (self.dir / "stderr.log").open("ab") as log:
            self.process = subprocess.Popen(
                [
                    NGINX,
                    "-p",
                    self.dir,
                    "-c",
                    config,
                    "-g",
                    f"daemon off; pid {self.dir}/nginx.pid;",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(lambda: self._alive() and listening(self.port), 10, "nginx listening")
        return f"http://127.0.0.1:{self.port}/users/{{id}}"

    def _alive(self) -> bool:
        assert self.process.poll() is None, f"nginx exited; see {self.dir}/error.log"
        return True

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful: the log is complete
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.recorder.__exit__(*exc)

    def calls(self) -> list[Call]:
        calls = []
        for line in (self.dir / "access.log").read_text().splitlines():
            # $msec is when the answer went; less $request_time, when the call came.
            answered, status, uri, took = line.split(" ")
            arrived = float(answered) - float(took)
            calls.append((arrived, int(status), int(uri.rsplit("/", 1)[-1])))
        return calls

    def accepted_upstream(self) -> int:
        return len(self.record.calls)


class Bucket:
    """nginx's limit_req arithmetic: the excess leaks `rate` a second; a call that
    would make it exceed `burst` is refused and changes nothing."""

    def __init__(self, rate: int, burst: int):
        self.rate, self.burst = rate, burst
        self.excess, self.last = 0.0, None
        self.lock = threading.Lock()

    def take(self, now: float) -> float | None:
        """How long an accepted call is held (without nodelay), or None: refused."""
        with self.lock:
            if self.last is None:
                self.last = now
                return 0.0
            excess = max(0.0, self.excess - self.rate * (now - self.last) + 1)
            if excess > self.burst:
                return None
            self.excess, self.last = excess, now
            return excess / self.rate


class StandIn:
    """The same limiter in Python, for a machine without nginx."""

    def __init__(self, scenario: Scenario, folder: Path):
        self.scenario = scenario
        self.bucket = Bucket(scenario.rate, scenario.burst)
        self.seen: list[Call] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True

    def _handler(self):
        outer = self

        class Limited(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                arrived = time.time()
                held = outer.bucket.take(arrived)
                if held and not outer.scenario.nodelay:
                    time.sleep(held)
                self.send_response(200 if held is not None else 429)
                if held is None:
                    self.send_header("Retry-After", "1")
                self.send_header("Content-Length", "0")
                self.end_headers()
                user_id = int(self.path.rsplit("/", 1)[-1])
                outer.seen.append((arrived, 200 if held is not None else 429, user_id))

            do_GET = do_POST

            def log_message(self, *args):
                pass

        return Limited

    def __enter__(self) -> str:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_port}/users/{{id}}"

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def calls(self) -> list[Call]:
        return list(self.seen)

    def accepted_upstream(self) -> int:
        return sum(1 for _, status, _ in self.seen if status == 200)


class Poll:
    """The default limit's capacity (its learned rate, or its RPM) and the task's last
    slot, read from PostgreSQL every POLL_SECONDS on a connection of its own."""

    QUERY = (
        "SELECT coalesce(least(l.rpm, r.learned_rpm), l.rpm), t.last_slot, t.status "
        "FROM limits l LEFT JOIN learned_rates r ON r.limit_id = l.id "
        "LEFT JOIN id_tasks t ON t.id = %s WHERE l.name = 'default'"
    )

    def __init__(self, url: str, task_id: int):
        self.url, self.task_id = url, task_id
        self.samples: list[tuple[float, int, datetime | None, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Poll:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self._stop.is_set():
                row = conn.execute(self.QUERY, (self.task_id,)).fetchone()
                if row:
                    self.samples.append((time.time(), *row))
                self._stop.wait(POLL_SECONDS)

    def latest(self):
        return self.samples[-1] if self.samples else None


def reset() -> None:
    # The default limit goes too: recorded again from this run's settings, its URL names
    # this run's downstream.
    db.session.execute(
        text(
            "TRUNCATE users, id_tasks, task_id_chunks, assignments, slots, settings, "
            "limits, learned_rates, limit_events"
        )
    )
    db.session.commit()
    get_redis().flushdb()


def start(name: str, command: list[str], env: dict, logs: Path) -> subprocess.Popen:
    """A `flask ...` process in a session of its own, its output kept in its log."""
    with (logs / f"{name}.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "flask", "--app", "wsgi", *command],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stack_env(url: str) -> dict[str, str]:
    settings = {**SETTINGS, "PROCESSOR_HTTP_URL": url}
    os.environ.update({name: str(value) for name, value in settings.items()})
    return dict(os.environ)


def run(scenario: Scenario, folder: Path) -> dict:
    logs = folder / "logs"
    logs.mkdir(parents=True)
    downstream = (Nginx if NGINX.exists() else StandIn)(scenario, folder)
    with downstream as url:
        env = stack_env(url)
        app = create_app()
        migrate = [sys.executable, "-m", "flask", "--app", "wsgi", "db", "upgrade"]
        with (logs / "migrate.log").open("ab") as log:
            subprocess.run(migrate, cwd=ROOT, env=env, stdout=log, stderr=log, check=True)
        with app.app_context():
            reset()
            processes = [start("scheduler", ["scheduler"], env, logs)]
            processes += [start(f"worker-{n}", ["worker"], env, logs) for n in range(WORKERS)]
            try:
                task = submit_task("backpressure", range(1, scenario.ids + 1), "defer")
                say(f"task {task.id}: {scenario.ids} IDs submitted, downstream {url}")
                with Poll(os.environ["DATABASE_URL"], task.id) as poll:
                    planned = wait_for(lambda: (poll.latest() or (0, 0, None))[2], 60, "a plan")
                    deadline = time.time() + 4 * scenario.needs() + 60
                    wait_for(
                        lambda: (poll.latest() or ())[3] in FINISHED,
                        deadline - time.time(),
                        "the task's end",
                    )
                    time.sleep(POLL_SECONDS * 2)
                figures = outcome(task.id)
            finally:
                stop(processes)
    figures.update(
        calls=downstream.calls(),
        upstream=downstream.accepted_upstream(),
        samples=poll.samples,
        planned_last_slot=planned,
        downstream="nginx" if isinstance(downstream, Nginx) else "Python stand-in",
    )
    return figures


def outcome(task_id: int) -> dict:
    db.session.remove()
    row = db.session.execute(
        text(
            "SELECT count(*) FILTER (WHERE status = 'done') AS done, "
            "count(*) FILTER (WHERE status = 'failed') AS failed, "
            "count(*) AS total, max(finished_at) AS last_done FROM assignments "
            "WHERE task_id = :t"
        ),
        {"t": task_id},
    ).one()
    task = db.session.execute(
        text("SELECT status, last_slot FROM id_tasks WHERE id = :t"), {"t": task_id}
    ).one()
    events = db.session.execute(
        text(
            "SELECT at, kind, from_rpm, to_rpm, moved, finished_at, reason FROM limit_events "
            "ORDER BY id"
        )
    ).all()
    return {
        "done": row.done,
        "failed": row.failed,
        "assignments": row.total,
        "last_done": row.last_done.timestamp() if row.last_done else None,
        "status": task.status,
        "last_slot": task.last_slot,
        "events": events,
    }


def share(count: int, of: int) -> str:
    return f"{count} / {of} ({count / of:.1%})"


def met(ok: bool) -> str:
    return "yes" if ok else "NO"


def report(scenario: Scenario, figures: dict) -> None:
    ids = scenario.ids
    calls = sorted(figures["calls"])
    refused = [(at, user_id) for at, status, user_id in calls if status == 429]
    others = Counter(status for _, status, _ in calls if status not in (200, 429))
    began = calls[0][0] if calls else time.time()
    refused_ids = {user_id for _, user_id in refused}
    late_ids: set[int] = set()
    if refused:
        first = refused[0][0]
        late_ids = {user_id for at, user_id in refused if at > first + LATE_AFTER_SECONDS}
    took = figures["last_done"] - began if figures["last_done"] else float("nan")
    ratio = took / scenario.needs()
    aims = scenario.aims
    rows = [
        (
            "IDs refused at least once",
            share(len(refused_ids), ids),
            f"<= {aims['refused_ids']:.0%}" if "refused_ids" in aims else "",
            met(len(refused_ids) / ids <= aims["refused_ids"]) if "refused_ids" in aims else "",
        ),
        (
            "refused calls (per ID)",
            share(len(refused), ids),
            "0" if "calls" in aims else "",
            met(len(refused) <= aims["calls"]) if "calls" in aims else "",
        ),
        (
            f"IDs refused > {LATE_AFTER_SECONDS:g} s after the first refusal",
            share(len(late_ids), ids),
            f"<= {aims['late_ids']:.0%}" if "late_ids" in aims else "",
            met(len(late_ids) / ids <= aims["late_ids"]) if "late_ids" in aims else "",
        ),
        ("first call to last ID done", f"{took:.1f} s", "", ""),
        (
            "the downstream's own need",
            f"{scenario.needs():.1f} s ({ids} / {scenario.rate} a s)",
            "",
            "",
        ),
        (
            "ratio",
            f"{ratio:.2f}",
            f"<= {aims['ratio']:g}" if "ratio" in aims else "",
            met(ratio <= aims["ratio"]) if "ratio" in aims else "",
        ),
        (
            "IDs done / failed (PostgreSQL)",
            f"{figures['done']} / {figures['failed']} (task {figures['status']})",
            f"{ids} / 0",
            met(figures["done"] == ids and figures["failed"] == 0),
        ),
        (
            "task's last_slot",
            moved(figures["planned_last_slot"], figures["last_slot"], began),
            "",
            "",
        ),
    ]
    print(table(("figure", "value", "aim", "met"), rows))
    notes = [
        f"downstream: {figures['downstream']}; calls {len(calls)}, accepted "
        f"{sum(1 for _, s, _ in calls if s == 200)} (the recorder behind it saw "
        f"{figures['upstream']})"
    ]
    if others:
        notes.append(f"other statuses: {dict(others)}")
    if refused:
        notes.append(
            f"refusals from {refused[0][0] - began:+.1f} s to {refused[-1][0] - began:+.1f} s "
            "after the first call"
        )
    notes.append("learned rate (polled): " + series(figures["samples"], began))
    for at, kind, from_rpm, to_rpm, moved_ids, finished, reason in figures["events"]:
        replanned = "never re-planned"
        if finished is not None:
            replanned = f"re-planned {(finished - at).total_seconds():.1f} s later"
        notes.append(
            f"event {at.timestamp() - began:+.1f} s: {kind} {from_rpm} -> {to_rpm}, "
            f"{replanned}, {moved_ids} IDs moved ({reason.split(' (HTTP')[0]})"
        )
    notes.append("calls per 2 s, accepted/refused: " + per_slot(calls, began))
    notes.append(
        f"most calls coming within 1 s: {busiest_second(calls)} (the downstream takes "
        f"{scenario.rate} a s; after a pause, {scenario.rate + scenario.burst + 1} in a second)"
    )
    for note in notes:
        print(f"  {note}")


def moved(planned: datetime | None, final: datetime | None, began: float) -> str:
    if planned is None or final is None:
        return f"{planned} -> {final}"
    shift = (final - planned).total_seconds()
    return (
        f"{planned.timestamp() - began:+.0f} s after planning, "
        f"{final.timestamp() - began:+.0f} s at the end (moved {shift:+.0f} s)"
    )


def series(samples, began: float) -> str:
    """The polled capacity where it changed, times from the first call."""
    points, last = [], None
    for at, capacity, *_ in samples:
        if capacity != last:
            points.append(f"t={at - began:+.1f} {capacity}")
            last = capacity
    return ", ".join(points)


def per_slot(calls: list[Call], began: float) -> str:
    accepted = Counter(int((at - began) // SLOT_SECONDS) for at, s, _ in calls if s == 200)
    refused = Counter(int((at - began) // SLOT_SECONDS) for at, s, _ in calls if s == 429)
    last = max([*accepted, *refused], default=-1)
    return " ".join(f"{accepted[n]}/{refused[n]}" for n in range(last + 1))


def busiest_second(calls: list[Call]) -> int:
    times = [at for at, _, _ in calls]
    most, first = 0, 0
    for last, at in enumerate(times):
        while at - times[first] >= 1.0:
            first += 1
        most = max(most, last - first + 1)
    return most


def table(header, rows) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(row) + " |" for row in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.backpressure",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--exact", action="store_true", help="the downstream at the limit's rate")
    parser.add_argument("--runs", type=int, default=1, help="runs of the scenario (default 1)")
    args = parser.parse_args(argv)
    scenario = EXACT if args.exact else SLOW
    root = Path(tempfile.mkdtemp(prefix="backpressure-"))
    root.chmod(0o755)
    print(f"logs of every process under {root}", flush=True)
    for number in range(1, args.runs + 1):
        figures = run(scenario, root / f"run-{number}")
        print(
            f"\nrun {number}: downstream at {scenario.rate} a s (burst {scenario.burst}, "
            f"{'nodelay' if scenario.nodelay else 'delay'}), limit at RPM {SETTINGS['RPM']} "
            f"a {SLOT_SECONDS}-s slot, {scenario.ids} IDs ({scenario.name})"
        )
        report(scenario, figures)
    print(f"logs: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
