"""Ten million IDs through the real stack, to show that claiming and recording cost the
same after them as before, and that retention gives the space back. Run by hand:
`DATABASE_URL=postgresql://postgres@127.0.0.1:5432/<own db> REDIS_URL=redis://127.0.0.1:6379/<n>
python -m bench.soak [--tasks 10] [--ids 1000000] [--workers 2]`.

The stack is `flask scheduler` and `--workers` `flask worker` processes, with
`record_user`, pacing off and 1-s slots of 10,000 IDs. The same IDs (1 to `--ids`) go
in every task, and their users are made before the first figure is taken, so that the
sizes measure what the IDs themselves cost. Task after task is submitted once the one
before has finished, each planned into slots that have passed, so that every slot runs
at once (late): the throughput is then the claims' and records' own, not the plan's.

It prints, per task: its IDs' claim-plus-record throughput (IDs over the time from the
first recorded to the last), the p99 of a claim of `CLAIM_BATCH` pending IDs of the slot
being run (the claim's own statement, timed from a connection of the bench's own every
0.1 s and rolled back, so it takes nothing), and the dead tuples of the day's partition.
The server's autovacuum is switched on for the run if it is off (`--autovacuum-as-is`
leaves it), and back after. Then the database's size before, at the peak and after
retention (`keep_days` as of RETENTION_DAYS and two days after now, then a plain VACUUM
as autovacuum would run), the dead tuples at the end and EXPLAIN ANALYZE of the claim on
the last slot.

It empties the tables and the Redis database it is given: use ones of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import flask_migrate
import psycopg
from sqlalchemy import text

from service import create_app
from service.core.extensions import db, get_redis
from service.core.models import AssignmentStatus
from service.dispatch.slot_runs import CLAIM_BATCH
from service.planning.store import database_now
from service.planning.windows import plan_stored_task
from service.retention.services import keep_days
from service.tasks.services import submit_task
from tests.helpers import percentile
from tests.processes import start, stop

PER_SLOT = 10_000
SETTINGS = {
    "SLOT_SECONDS": 1,
    "WINDOW_SLOTS": 60,
    "PLAN_LEAD_SECONDS": 0.2,
    "RPM": PER_SLOT,
    "PACING": "false",
    "ID_PROCESSOR": "workers.processors:record_user",
    "RECONCILE_INTERVAL_SECONDS": 1,
    "MAX_HELPERS_PER_SLOT": 0,
}
# Every task is planned from this far back: its slots have all passed when it is.
BACK = timedelta(hours=6)
# The claim's own first half (service/dispatch/store.py, CLAIM), without the update.
CLAIM_PROBE = (
    "SELECT task_id, position FROM assignments "
    "WHERE limit_id = %s AND slot_start = %s AND status = 'pending' "
    "ORDER BY task_id, position LIMIT %s FOR UPDATE SKIP LOCKED"
)
EARLIEST_PENDING_SLOT = (
    "SELECT slot_start FROM assignments WHERE limit_id = %s AND status = 'pending' "
    "ORDER BY slot_start LIMIT 1"
)


class ClaimProbe(threading.Thread):
    """Times a claim of the earliest slot with pending IDs every 0.1 s, from a
    connection of its own, rolled back; each timing is filed under the task running."""

    def __init__(self, url: str, limit_id: int):
        super().__init__(daemon=True)
        self.url, self.limit_id = url, limit_id
        self.task: int | None = None
        self.timings: dict[int, list[float]] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.url) as connection:
            while not self.stopping.wait(0.1):
                task = self.task
                if task is None:
                    continue
                slot = connection.execute(EARLIEST_PENDING_SLOT, (self.limit_id,)).fetchone()
                if slot is None:
                    connection.rollback()
                    continue
                started = time.perf_counter()
                connection.execute(CLAIM_PROBE, (self.limit_id, slot[0], CLAIM_BATCH)).fetchall()
                self.timings.setdefault(task, []).append(time.perf_counter() - started)
                connection.rollback()


def database_size() -> int:
    return db.session.scalar(text("SELECT pg_database_size(current_database())"))


def users_size() -> int:
    """The users' table with its indexes and TOAST: the product's data, which retention
    leaves alone, and which record_user's updates make grow until vacuum reuses them."""
    return db.session.scalar(text("SELECT pg_total_relation_size('users')"))


def dead_tuples() -> dict[str, tuple[int, int]]:
    """(live, dead) tuples of the tables that grow with IDs and users."""
    db.session.execute(text("SELECT pg_stat_clear_snapshot()"))
    rows = db.session.execute(
        text(
            "SELECT relname, n_live_tup, n_dead_tup FROM pg_stat_user_tables "
            "WHERE relname LIKE 'assignments%' OR relname IN ('users', 'slots', 'id_tasks') "
            "ORDER BY relname"
        )
    ).all()
    return {name: (live, dead) for name, live, dead in rows}


def reset(ids: int) -> None:
    db.session.execute(
        text(
            "TRUNCATE users, id_tasks, task_id_chunks, assignments, slots, settings, "
            "limits, learned_rates, limit_events"
        )
    )
    db.session.execute(
        text("INSERT INTO users (id, times_processed) SELECT n, 0 FROM generate_series(1, :n) n"),
        {"n": ids},
    )
    db.session.commit()
    get_redis().flushdb()
    vacuum()


def vacuum() -> None:
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE"))


def wait_until_finished(task_id: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = db.session.scalar(
            text("SELECT status FROM id_tasks WHERE id = :t"), {"t": task_id}
        )
        db.session.commit()
        if status in ("done", "failed"):
            return status
        time.sleep(0.5)
    raise RuntimeError(f"task {task_id} did not finish in {timeout:.0f} s")


def throughput(task_id: int) -> float:
    """IDs a second from the task's first recorded outcome to its last."""
    first, last, done = db.session.execute(
        text(
            "SELECT min(finished_at), max(finished_at), count(*) FROM assignments "
            "WHERE task_id = :t AND status = :done"
        ),
        {"t": task_id, "done": AssignmentStatus.DONE},
    ).one()
    db.session.commit()
    return done / max((last - first).total_seconds(), 1e-3)


def explain_claim(limit_id: int) -> str:
    slot = db.session.scalar(text("SELECT max(slot_start) FROM slots"))
    plan = db.session.execute(
        text(
            "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) SELECT task_id, position FROM assignments "
            "WHERE limit_id = :l AND slot_start = :s AND status = :pending "
            "ORDER BY task_id, position LIMIT :n"
        ),
        {"l": limit_id, "s": slot, "pending": AssignmentStatus.PENDING, "n": CLAIM_BATCH},
    ).scalars()
    db.session.rollback()
    return "\n".join("    " + line for line in plan)


def megabytes(size: int) -> str:
    return f"{size / 2**20:,.0f} MB"


@contextlib.contextmanager
def autovacuum_on(leave_as_is: bool) -> Iterator[str]:
    """The server's autovacuum on for the run, as a deployment has it, then as it was: a
    server set up for tests may have it off, and without it dead rows pile up for ever.
    It is a setting of the whole server, changed with ALTER SYSTEM (a superuser's)."""
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        was = connection.execute(text("SHOW autovacuum")).scalar()
        if was == "on" or leave_as_is:
            yield was
            return
        connection.execute(text("ALTER SYSTEM SET autovacuum = on"))
        connection.execute(text("SELECT pg_reload_conf()"))
        try:
            yield "on for this run (it was off)"
        finally:
            connection.execute(text("ALTER SYSTEM RESET autovacuum"))
            connection.execute(text("SELECT pg_reload_conf()"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--ids", type=int, default=1_000_000, help="IDs per task")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--autovacuum-as-is",
        action="store_true",
        help="leave the server's autovacuum as it is, off included",
    )
    args = parser.parse_args()
    os.environ.update({name: str(value) for name, value in SETTINGS.items()})
    app = create_app()
    with app.app_context(), autovacuum_on(args.autovacuum_as_is) as autovacuum:
        flask_migrate.upgrade(directory=str(ROOT / "migrations"))
        reset(args.ids)
        before, users_before = database_size(), users_size()
        print(
            f"{args.tasks} tasks of {args.ids:,} IDs, {args.workers} workers, record_user, "
            f"pacing off, {PER_SLOT:,} IDs a 1-s slot, {os.cpu_count()} CPUs, autovacuum "
            f"{autovacuum}; database {megabytes(before)} with the users made",
            flush=True,
        )
        processes = [start(["scheduler"], SETTINGS)]
        processes += [start(["worker"], SETTINGS) for _ in range(args.workers)]
        probe = None
        rows = []
        try:
            for k in range(args.tasks):
                task = submit_task(f"soak-{k + 1}", range(1, args.ids + 1), "defer")
                started = time.perf_counter()
                plan_stored_task(task.id, now=database_now() - BACK)
                planned = time.perf_counter() - started
                if probe is None:
                    url = db.engine.url.set(drivername="postgresql")
                    probe = ClaimProbe(url.render_as_string(hide_password=False), task.limit_id)
                    probe.start()
                probe.task = task.id
                wait_until_finished(task.id, timeout=3600)
                probe.task = None
                rate = throughput(task.id)
                claims = probe.timings.get(task.id, [])
                p99 = percentile(claims, 0.99) * 1000 if claims else float("nan")
                partition = {
                    name: figures
                    for name, figures in dead_tuples().items()
                    if name.startswith("assignments_")
                }
                dead = sum(d for _, d in partition.values())
                rows.append((k + 1, rate, p99, len(claims), planned, dead))
                print(
                    f"task {k + 1:>2}: {rate:>8,.0f} IDs/s claimed and recorded, claim p99 "
                    f"{p99:6.2f} ms ({len(claims)} probes), planned in {planned:5.1f} s, "
                    f"dead tuples in the partitions {dead:,}, users {megabytes(users_size())}",
                    flush=True,
                )
            peak, users_peak = database_size(), users_size()
            end_tuples = dead_tuples()
            explained = explain_claim(task.limit_id)
        finally:
            if probe is not None:
                probe.stopping.set()
            stop(processes)
        retention_now = datetime.now(UTC) + timedelta(days=app.config["RETENTION_DAYS"] + 2)
        upkeep = keep_days(now=retention_now)
        vacuum()
        after, users_after = database_size(), users_size()
    first, last = rows[0], rows[-1]
    print(f"\nlast task's throughput over the first's: {last[1] / first[1]:.2f}")
    print(f"last task's claim p99 over the first's:  {last[2] / first[2]:.2f}")
    print(
        f"database: {megabytes(before)} before, {megabytes(peak)} at the peak, "
        f"{megabytes(after)} after retention ({after / before:.2f} of before; "
        f"days removed {[day.isoformat() for day in upkeep.removed]}, {upkeep.tasks} tasks)"
    )
    rest = (before - users_before, peak - users_peak, after - users_after)
    print(
        f"without users: {megabytes(rest[0])} before, {megabytes(rest[1])} at the peak, "
        f"{megabytes(rest[2])} after ({rest[2] / rest[0]:.2f} of before); users: "
        f"{megabytes(users_before)}, {megabytes(users_peak)}, {megabytes(users_after)}"
    )
    print("live and dead tuples at the end, before retention:")
    for name, (live, dead) in end_tuples.items():
        print(f"    {name:<24} {live:>12,} live {dead:>12,} dead")
    print("the claim on the last slot, at the end:")
    print(explained)


if __name__ == "__main__":
    main()
