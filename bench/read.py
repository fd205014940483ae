"""Read-path benchmark, run by hand: `DATABASE_URL=... REDIS_URL=... python bench/read.py`.

Fills one database (10,000 users; 100 tasks of 1,000 IDs each, planned), then serves it
twice under the same gunicorn settings (2 workers, gthread, 4 threads): the service's app,
and a bare Flask + Flask-SQLAlchemy app written here that runs the same page query and
count and answers the same JSON, nothing more. For

    GET /users/?page_size=50
    GET /celery_ids_tasks/?page_size=100
    GET /celery_ids_tasks/<id>/

it checks that both answer the same JSON, then runs alternating rounds of load against
each (wrk with 16 connections, or a Python load generator where wrk is absent) and prints
requests/s and p99 of both and their ratios (aim: 0.7 or more of the bare requests/s, a
p99 at most 1.5 times the bare one), with the CPU time the workers spent per request (the
figure that other load on the machine moves least) and the requests that failed or
timed out.

It empties the tables and the Redis database it is given: point it at ones of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from math import ceil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import flask_migrate
import httpx
import psutil
from flask import Flask, jsonify, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import func, select, text
from sqlalchemy.ext.declarative import DeferredReflection
from sqlalchemy.orm import defer

from service import create_app
from service.core.extensions import db, get_redis
from service.planning.windows import plan_stored_task
from service.tasks.services import submit_task
from tests.processes import free_port

# Far enough ahead that every slot of the window is open whatever the clock says.
PLAN_AT = datetime(2030, 1, 7, 9, 59, 50, tzinfo=UTC)
GUNICORN = ["--workers", "2", "--worker-class", "gthread", "--threads", "4"]
FINISHED = ("done", "failed", "cancelled")

# The bare app: plain Flask-SQLAlchemy models over the service's tables, reflected at start.
bare = SQLAlchemy()


class _Reflected(DeferredReflection):
    __abstract__ = True


class BareUser(_Reflected, bare.Model):
    __tablename__ = "users"


class BareTask(_Reflected, bare.Model):
    __tablename__ = "id_tasks"


class BareLimit(_Reflected, bare.Model):
    __tablename__ = "limits"


def bare_app() -> Flask:
    """gunicorn 'bench.read:bare_app()'."""
    app = Flask("bare")
    url = os.environ["DATABASE_URL"].replace("postgresql://", "postgresql+psycopg://", 1)
    app.config["SQLALCHEMY_DATABASE_URI"] = url
    bare.init_app(app)
    with app.app_context():
        _Reflected.prepare(bare.engine)
    app.add_url_rule("/users/", view_func=bare_users)
    app.add_url_rule("/celery_ids_tasks/", view_func=bare_tasks)
    app.add_url_rule("/celery_ids_tasks/<int:task_id>/", view_func=bare_task)
    return app


def bare_users():
    query = select(BareUser).order_by(BareUser.date_created.desc(), BareUser.id.desc())
    return _bare_page(query, BareUser, lambda row: _user_json(*row))


def _tasks_with_their_limit():
    joined = select(BareTask, BareLimit.name)
    return joined.outerjoin(BareLimit, BareTask.limit_id == BareLimit.id)


def bare_tasks():
    order = (BareTask.date_created.desc(), BareTask.id.desc())
    query = _tasks_with_their_limit().options(defer(BareTask.payload)).order_by(*order)
    return _bare_page(query, BareTask, lambda row: _task_json(*row))


def bare_task(task_id: int):
    row = bare.session.execute(
        _tasks_with_their_limit().where(BareTask.id == task_id)
    ).one_or_none()
    if row is None:
        return jsonify({"message": "not found"}), 404
    task, limit = row
    return jsonify({**_task_json(task, limit), "payload": task.payload})


def _bare_page(query, model, to_json):
    page = request.args.get("page", 1, type=int)
    page_size = request.args.get("page_size", 10, type=int)
    rows = bare.session.execute(query.offset((page - 1) * page_size).limit(page_size)).all()
    total = bare.session.scalar(select(func.count()).select_from(model))
    response = jsonify([to_json(row) for row in rows])
    response.headers["X-Pagination"] = json.dumps(_pagination(total, page, page_size))
    return response


def _pagination(total: int, page: int, page_size: int) -> dict:
    pages = ceil(total / page_size)
    header = {"total": total, "total_pages": pages, "first_page": 1, "last_page": pages}
    header["page"] = page
    if page < pages:
        header["next_page"] = page + 1
    return header


def _moment(value: datetime | None) -> str | None:
    return value and value.isoformat()


def _user_json(user) -> dict:
    return {
        "id": user.id,
        "name": user.name,
        "date_created": _moment(user.date_created),
        "last_processed_at": _moment(user.last_processed_at),
        "times_processed": user.times_processed,
    }


def _task_json(task, limit: str | None) -> dict:
    cancelled = task.status == "cancelled"
    return {
        "id": task.id,
        "task_name": task.task_name,
        "task_status": task.status in FINISHED,
        "date_created": _moment(task.date_created),
        "status": task.status,
        "limit": limit,
        "overflow": task.overflow,
        "total": task.total,
        "duplicates": task.duplicates,
        "planned": task.planned,
        "done": task.done,
        "failed": task.failed,
        "pending": 0 if cancelled else task.total - task.done - task.failed,
        "not_before": _moment(task.not_before),
        "first_slot": _moment(task.first_slot),
        "last_slot": _moment(task.last_slot),
        "ids_url": f"{request.host_url}celery_ids_tasks/{task.id}/ids/",
    }


# Filling the database.


def fill(users: int, tasks: int, ids_per_task: int) -> int:
    """Empty the tables, store the users and the planned tasks; the newest task's id."""
    db.session.execute(
        text("TRUNCATE users, id_tasks, task_id_chunks, assignments, slots RESTART IDENTITY")
    )
    # Users as the processor leaves them (no name), a few created by hand.
    db.session.execute(
        text(
            "INSERT INTO users (id, name, date_created, last_processed_at, times_processed) "
            "SELECT 1000000000 + g, CASE WHEN g % 10 = 0 THEN 'user ' || g END, "
            "  now() - g * interval '1 second', now() - g * interval '1 second', 1 "
            "FROM generate_series(1, :users) AS g"
        ),
        {"users": users},
    )
    db.session.commit()
    get_redis().flushdb()
    for number in range(tasks):
        first = 1_000_000_000 + number * ids_per_task
        task = submit_task(f"newsletter {number}", range(first, first + ids_per_task))
        plan_stored_task(task.id, now=PLAN_AT)
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))
    return task.id


# Serving.


@dataclass
class Server:
    name: str
    base: str
    process: subprocess.Popen


def serve(name: str, app_path: str, extra: list[str], log_dir: Path) -> Server:
    port = free_port()
    log = open(log_dir / f"{name}.log", "w")  # noqa: SIM115 (kept open for the child)
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", *GUNICORN]
        + [*extra, app_path],
        cwd=ROOT,
        env={key: value for key, value in os.environ.items() if key != "API_TOKEN"},
        stdout=log,
        stderr=log,
    )
    server = Server(name, f"http://127.0.0.1:{port}", process)
    _wait_until_up(server, log_dir / f"{name}.log")
    return server


def _wait_until_up(server: Server, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise SystemExit(f"{server.name} did not start:\n{log.read_text()}")
        try:
            if httpx.get(server.base + "/users/", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{server.name} did not answer within 60 s")


def stop(servers: list[Server]) -> None:
    for server in servers:
        server.process.terminate()
    for server in servers:
        server.process.wait(30)


def same_answer(service: Server, bare_server: Server, path: str) -> tuple[bool, int, int]:
    """Whether both answer the same JSON and pagination; the two answers' sizes."""
    ours, theirs = httpx.get(service.base + path), httpx.get(bare_server.base + path)
    # Links name the host that answered: compare them as if both were the bare one.
    ours_json = json.loads(ours.text.replace(service.base, bare_server.base))
    same = ours.status_code == theirs.status_code == 200 and ours_json == theirs.json()
    pages = ours.headers.get("X-Pagination"), theirs.headers.get("X-Pagination")
    same = same and (pages[0] and json.loads(pages[0])) == (pages[1] and json.loads(pages[1]))
    return same, len(ours.content), len(theirs.content)


# Load.


@dataclass
class Round:
    requests_per_second: float
    p99_ms: float
    failures: int
    requests: int
    # CPU time the server's worker processes spent per request: what load on the
    # machine from others moves least.
    cpu_ms: float = 0.0


WRK_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def wrk_round(url: str, seconds: float, connections: int) -> Round:
    threads = min(2, connections)
    done = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    )
    out = done.stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    value, unit = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
    failures = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: .*", out)
    failed = int(failures.group(1)) if failures else 0
    if errors:
        failed += sum(int(n) for n in re.findall(r"\d+", errors.group(0)))
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    return Round(rate, float(value) * WRK_UNITS[unit], failed, requests)


def python_round(url: str, seconds: float, connections: int) -> Round:
    """wrk's closed loop in asyncio: each connection sends its next request when the last
    answer has arrived, over one keep-alive connection."""
    latencies: list[float] = []
    statuses: Counter = Counter()
    started = time.perf_counter()
    asyncio.run(_load(httpx.URL(url), started + seconds, connections, latencies, statuses))
    elapsed = time.perf_counter() - started
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else 0
    failures = sum(count for status, count in statuses.items() if status != 200)
    return Round(len(latencies) / elapsed, p99 * 1000, failures, len(latencies))


async def _load(url, deadline, connections, latencies, statuses) -> None:
    target = url.raw_path.decode()
    head = f"GET {target} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n\r\n".encode()
    await asyncio.gather(
        *(_connection(url, head, deadline, latencies, statuses) for _ in range(connections))
    )


async def _connection(url, head, deadline, latencies, statuses) -> None:
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            writer.write(head)
            status = await _read_answer(reader)
            latencies.append(time.perf_counter() - sent)
            statuses[status] += 1
    finally:
        writer.close()


async def _read_answer(reader) -> int:
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


def measure(servers, path, rounds, seconds, connections, load) -> dict[str, list[Round]]:
    """Alternating rounds, each side first in every other round, after a warm-up of each."""
    for server in servers:
        load(server.base + path, 2, connections)
    results: dict[str, list[Round]] = {server.name: [] for server in servers}
    for number in range(rounds):
        order = servers if number % 2 == 0 else servers[::-1]
        for server in order:
            cpu = worker_cpu_seconds(server)
            result = load(server.base + path, seconds, connections)
            result.cpu_ms = (worker_cpu_seconds(server) - cpu) * 1000 / max(result.requests, 1)
            results[server.name].append(result)
            print(
                f"    round {number + 1} {server.name:7} {result.requests_per_second:7.0f} "
                f"req/s  p99 {result.p99_ms:6.1f} ms  CPU {result.cpu_ms:5.2f} ms/request",
                flush=True,
            )
    return results


def worker_cpu_seconds(server: Server) -> float:
    workers = psutil.Process(server.process.pid).children()
    return sum(sum(worker.cpu_times()[:2]) for worker in workers)


def report(path: str, results: dict[str, list[Round]], check: tuple[bool, int, int]) -> None:
    same, ours, theirs = check
    rate = {
        name: statistics.mean(r.requests_per_second for r in rs) for name, rs in results.items()
    }
    p99 = {name: statistics.median(r.p99_ms for r in rs) for name, rs in results.items()}
    failures = {name: sum(r.failures for r in rs) for name, rs in results.items()}
    cpu = {name: statistics.median(r.cpu_ms for r in rs) for name, rs in results.items()}
    print(f"GET {path}  (answer {ours:,} bytes; bare {theirs:,}; same JSON: {same})")
    for name in results:
        print(
            f"  {name:7} {rate[name]:7.0f} req/s  p99 {p99[name]:6.1f} ms  "
            f"CPU {cpu[name]:5.2f} ms/request  failed or timed out {failures[name]}"
        )
    print(
        f"  ratio   {rate['service'] / rate['bare']:.2f}x req/s (aim 0.7 or more)  "
        f"p99 {p99['service'] / p99['bare']:.2f}x (aim 1.5 or less)  "
        f"CPU {cpu['service'] / cpu['bare']:.2f}x",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--ids-per-task", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--load", choices=("wrk", "python"), default=None)
    parser.add_argument("--only", help="bench only the paths holding this text")
    args = parser.parse_args()

    load_kind = args.load or ("wrk" if shutil.which("wrk") else "python")
    load = wrk_round if load_kind == "wrk" else python_round
    app = create_app()
    with app.app_context():
        flask_migrate.upgrade(directory=str(ROOT / "migrations"))
        newest = fill(args.users, args.tasks, args.ids_per_task)
    paths = [
        "/users/?page_size=50",
        "/celery_ids_tasks/?page_size=100",
        f"/celery_ids_tasks/{newest}/",
    ]
    paths = [path for path in paths if not args.only or args.only in path]
    print(
        f"{args.users:,} users, {args.tasks} tasks of {args.ids_per_task:,} IDs; gunicorn "
        f"{' '.join(GUNICORN)}; {load_kind}, {args.connections} connections, "
        f"{args.rounds} alternating rounds of {args.seconds:g} s",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-read-") as logs:
        servers = [
            serve("service", "wsgi:app", [], Path(logs)),
            # No config file: the service's gunicorn.conf.py is for the service.
            serve("bare", "bench.read:bare_app()", ["--config", os.devnull], Path(logs)),
        ]
        try:
            for path in paths:
                check = same_answer(servers[0], servers[1], path)
                results = measure(servers, path, args.rounds, args.seconds, args.connections, load)
                report(path, results, check)
        finally:
            stop(servers)


if __name__ == "__main__":
    main()
