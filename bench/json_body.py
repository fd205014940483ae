"""JSON body benchmark, run by hand: `DATABASE_URL=... REDIS_URL=... python bench/json_body.py`.

Builds JSON bodies of 1, 4 and 16 MiB (just under MAX_CONTENT_LENGTH) in both forms,
`{"task_name": ..., "ids": [...]}` (IDs of 7 to 10 digits, as json.dumps writes a list)
and `{"task_name": ..., "payload": "..."}` (the same IDs in one string, comma-separated),
sends each through the app with Flask's test client, in process, to POST
/celery_ids_tasks/, POST /celery_ids_tasks/preview and PUT /celery_ids_tasks/<id>/, and
prints the peak memory of handling it as a multiple of the body's size, beside a baseline
measured the same way in the same run: a bare Flask app whose one view reads the body's
bytes (request.get_data) and answers their length.

Two measures of each request:
- tracemalloc: the peak of Python's allocations during the request, less what was
  allocated before it. It sees the body read, the parsed document and the IDs, not what
  C libraries allocate outside Python's allocator (libpq's COPY buffers, for one).
- RSS: a fresh process per body reads the body from a file, makes one small request of the
  same kind, resets its RSS high-water mark (/proc/self/clear_refs), makes the request and
  reports VmHWM less the RSS it had before: everything the process touched, C libraries
  included, at the granularity of pages. The more honest of the two. That request's
  duration is printed too (without tracemalloc, which slows every allocation).

It empties the tables and the Redis database it is given: point it at ones of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import flask_migrate
from flask import Flask, request
from sqlalchemy import text

from service import create_app
from service.core.extensions import db, get_redis

MIB = 1 << 20
JSON = "application/json"
TASKS = "/celery_ids_tasks/"
# Each body stays this far under its size in MiB, so that 16 MiB fits MAX_CONTENT_LENGTH.
MARGIN = 1024
FORMS = ("ids", "payload")
ENDPOINTS = ("post", "preview", "put")


def body_of(form: str, size: int, seed: int = 7) -> bytes:
    """A body of the form, of at most `size` bytes and within a few bytes of it.

    Its IDs are distinct: repeats would add PostgreSQL's rewrite of the chunks to the
    time, which is not the body's reading."""
    # Enough for the largest body: at least 8 bytes an ID.
    drawn = iter(random.Random(seed).sample(range(1_000_000, 10_000_000_000), size // 8))
    ids, length = [], 0
    # ", " between the IDs of a list (json.dumps), "," in a payload; the rest is the frame.
    separator = 2 if form == "ids" else 1
    budget = size - 64
    while True:
        user_id = str(next(drawn))
        if length + len(user_id) + separator > budget:
            break
        ids.append(user_id)
        length += len(user_id) + separator
    if form == "ids":
        return ('{"task_name": "bench", "ids": [' + ", ".join(ids) + "]}").encode()
    return json.dumps({"task_name": "bench", "payload": ",".join(ids)}).encode()


def bare_app() -> Flask:
    """The baseline: reading the body's bytes, nothing more."""
    app = Flask("bare")

    @app.post("/read")
    def read():
        return {"bytes": len(request.get_data())}

    return app


class Target:
    """Where a body goes: the service's endpoint, or the bare app's one view."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.app = bare_app() if endpoint == "bare" else create_app()
        self.client = self.app.test_client()

    def prepare(self) -> str:
        """The path to send to; a PUT gets a task of its own to replace the IDs of."""
        if self.endpoint == "bare":
            return "/read"
        if self.endpoint == "preview":
            return f"{TASKS}preview"
        if self.endpoint == "post":
            return TASKS
        created = self.client.post(TASKS, json={"task_name": "put", "ids": [1, 2, 3]})
        assert created.status_code == 202, created.get_data(as_text=True)
        return f"{TASKS}{created.json['id']}/"

    def send(self, path: str, body: bytes) -> None:
        method = self.client.put if self.endpoint == "put" else self.client.post
        answer = method(path, data=body, content_type=JSON)
        assert answer.status_code < 300, (answer.status_code, answer.get_data(as_text=True))


def empty_stores(app) -> None:
    with app.app_context():
        db.session.execute(text("TRUNCATE users, id_tasks, task_id_chunks, assignments, slots"))
        db.session.commit()
        get_redis().flushdb()


def traced_peak(target: Target, body: bytes) -> int:
    """Bytes tracemalloc saw at the request's peak, beyond what was allocated before it."""
    path = target.prepare()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        target.send(path, body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - before


def _status(field: str) -> int:
    """A figure of /proc/self/status, in bytes."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(f"{field}:"))
    return int(line.split()[1]) * 1024


def rss_child(endpoint: str, body_file: str) -> None:
    """In a fresh process: the growth of the RSS high-water mark over one request."""
    body = Path(body_file).read_bytes()
    target = Target(endpoint)
    # A first small request, so that what every request loads once is loaded before.
    small = json.dumps({"task_name": "warm", "ids": [5, 6]}).encode()
    target.send(target.prepare(), small)
    path = target.prepare()
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # VmHWM := VmRSS
    started = time.perf_counter()
    target.send(path, body)
    seconds = time.perf_counter() - started
    print(_status("VmHWM") - before, seconds)


def rss_peak(endpoint: str, body: bytes) -> tuple[int, float]:
    """Bytes the RSS high-water mark of a fresh process grew by, and seconds, for one request."""
    with tempfile.NamedTemporaryFile(suffix=".json") as file:
        file.write(body)
        file.flush()
        done = subprocess.run(
            [sys.executable, __file__, "--rss-child", endpoint, file.name],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        )
    grown, seconds = done.stdout.strip().splitlines()[-1].split()
    return int(grown), float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,4,16", help="body sizes in MiB")
    parser.add_argument("--forms", default=",".join(FORMS))
    parser.add_argument("--endpoints", default=",".join(ENDPOINTS))
    parser.add_argument("--no-rss", action="store_true", help="tracemalloc only")
    parser.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    # Short plans for the previews, whatever the number of IDs.
    os.environ.setdefault("RPM", "100000")
    if args.rss_child:
        rss_child(*args.rss_child)
        return

    service = create_app()
    with service.app_context():
        flask_migrate.upgrade(directory=str(ROOT / "migrations"))
    empty_stores(service)
    targets = {name: Target(name) for name in ("bare", *args.endpoints.split(","))}
    print("peak memory of one request, as a multiple of the body's size")
    print(f"{'form':8} {'body':>10} {'endpoint':9} {'tracemalloc':>12} {'RSS':>6} {'seconds':>8}")
    for form in args.forms.split(","):
        for size_mib in map(int, args.sizes.split(",")):
            body = body_of(form, size_mib * MIB - MARGIN)
            for name, target in targets.items():
                traced = traced_peak(target, body) / len(body)
                rss = ""
                if not args.no_rss:
                    grown, seconds = rss_peak(name, body)
                    rss = f"{grown / len(body):6.2f} {seconds:8.2f}"
                print(f"{form:8} {len(body):>10,} {name:9} {traced:12.2f} {rss}")
                empty_stores(service)


if __name__ == "__main__":
    main()
