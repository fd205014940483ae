"""Dispatch benchmark, run by hand: `DATABASE_URL=... REDIS_URL=... python bench/dispatch.py`.

Prints:
- how late slot processing starts after the slot's start, p50 and p99 over short slots
  run by real scheduler and worker processes, against plain rq-scheduler jobs due at the
  same starts in the same run (what polling alone gives);
- a 10k-ID slot with the built-in processor and pacing off, against the naive design of
  one RQ job per ID, in the same run (the ratio).

It empties the tables and the Redis database it is given: point it at ones of its own.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import flask_migrate
from rq import Queue, SimpleWorker
from sqlalchemy import text

from service import create_app
from service.core.extensions import db, get_redis
from service.dispatch.slot_runs import run_slot
from service.jobs import get_scheduler
from service.planning.windows import plan_stored_task
from service.processors.builtin import record_user
from service.tasks.services import submit_task
from tests.helpers import percentile
from workers.context import job_context

PROBE_KEY = "bench:probe-delays"
NAIVE_QUEUE = "bench-naive"


def probe(slot_start: str) -> None:
    """A plain scheduled job: notes how long after its due time it started."""
    delay = time.time() - datetime.fromisoformat(slot_start).timestamp()
    with job_context():
        get_redis().rpush(PROBE_KEY, delay)


def naive_process_one(task_id: int, position: int) -> None:
    """The naive design: one RQ job per ID, each its own claim, call and commit."""
    with job_context():
        user_id = db.session.execute(
            text(
                "UPDATE assignments SET status = 'running' WHERE task_id = :t AND position = :p "
                "AND status = 'pending' RETURNING user_id"
            ),
            {"t": task_id, "p": position},
        ).scalar()
        record_user([user_id])
        db.session.execute(
            text(
                "UPDATE assignments SET status = 'done', attempts = attempts + 1, "
                "finished_at = clock_timestamp() WHERE task_id = :t AND position = :p"
            ),
            {"t": task_id, "p": position},
        )
        db.session.commit()


def empty() -> None:
    db.session.execute(text("TRUNCATE users, id_tasks, task_id_chunks, assignments, slots"))
    db.session.commit()
    get_redis().flushdb()


def start_latency(slots: int, slot_seconds: int) -> tuple[list[float], list[float]]:
    """Seconds from each slot's start to its first claim; and plain jobs' delays."""
    env = {
        **os.environ,
        "SLOT_SECONDS": str(slot_seconds),
        "WINDOW_SLOTS": "15",
        "RPM": "1",
        "PLAN_LEAD_SECONDS": "0.5",
    }
    empty()
    task = submit_task("latency", range(1, slots + 1), "defer")
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "flask", "--app", "wsgi", *command],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for command in (["worker"], ["worker"], ["worker", "-q", "probe"], ["scheduler"])
    ]
    try:
        deadline = time.monotonic() + slots * slot_seconds + 120
        scheduled = False
        while time.monotonic() < deadline:
            db.session.remove()
            row = db.session.execute(
                text("SELECT status, first_slot, last_slot FROM id_tasks WHERE id = :t"),
                {"t": task.id},
            ).one()
            if row.first_slot and not scheduled:
                for minute in range(slots):
                    slot = row.first_slot + timedelta(seconds=minute * slot_seconds)
                    get_scheduler().enqueue_at(
                        slot, "bench.dispatch.probe", slot.isoformat(), queue_name="probe"
                    )
                scheduled = True
            if row.status == "done":
                break
            time.sleep(0.5)
        else:
            raise SystemExit("the latency task did not finish")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)
    delays = (
        db.session.execute(
            text(
                "SELECT extract(epoch FROM started_at - slot_start) FROM slots ORDER BY slot_start"
            )
        )
        .scalars()
        .all()
    )
    probes = [float(value) for value in get_redis().lrange(PROBE_KEY, 0, -1)]
    return [float(delay) for delay in delays], probes


def slot_versus_naive(count: int) -> tuple[float, float]:
    past = datetime(2026, 1, 5, 8, 59, 50, tzinfo=UTC)
    empty()
    task = submit_task("one slot", range(1, count + 1))
    plan_stored_task(task.id, now=past)
    slot = db.session.execute(text("SELECT first_slot FROM id_tasks")).scalar()
    started = time.perf_counter()
    outcome = run_slot(slot)
    slot_seconds = time.perf_counter() - started
    assert outcome.processed == count, outcome

    empty()
    task = submit_task("one job per ID", range(1, count + 1))
    plan_stored_task(task.id, now=past)
    queue = Queue(NAIVE_QUEUE, connection=get_redis())
    for position in range(count):
        queue.enqueue("bench.dispatch.naive_process_one", task.id, position, result_ttl=0)
    started = time.perf_counter()
    SimpleWorker([queue], connection=get_redis()).work(burst=True, logging_level="WARNING")
    naive_seconds = time.perf_counter() - started
    done = db.session.execute(text("SELECT count(*) FROM assignments WHERE status = 'done'"))
    assert done.scalar() == count, "the naive run left IDs undone"
    return slot_seconds, naive_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=20, help="short slots timed for lateness")
    parser.add_argument("--slot-seconds", type=int, default=2)
    parser.add_argument("--ids", type=int, default=10_000, help="IDs in the one big slot")
    args = parser.parse_args()

    os.environ.setdefault("PACING", "false")
    app = create_app()
    with app.app_context():
        flask_migrate.upgrade(directory=str(ROOT / "migrations"))
        delays, probes = start_latency(args.slots, args.slot_seconds)
        print(f"slot start lateness over {len(delays)} slots of {args.slot_seconds} s")
        print(
            f"  slot jobs (due early, wait inside): p50 {percentile(delays, 0.5):.3f} s, "
            f"p99 {percentile(delays, 0.99):.3f} s, max {max(delays):.3f} s (aim: p99 < 0.25 s)"
        )
        if probes:
            print(
                f"  plain jobs due at the start:        p50 {percentile(probes, 0.5):.3f} s, "
                f"p99 {percentile(probes, 0.99):.3f} s, max {max(probes):.3f} s"
            )
        app.config["PACING"] = False
        app.config["RPM"] = args.ids  # all of them in one slot
        slot_seconds, naive_seconds = slot_versus_naive(args.ids)
        print(f"{args.ids:,} IDs, built-in processor, pacing off")
        print(f"  one slot job:       {slot_seconds:7.2f} s ({args.ids / slot_seconds:,.0f} IDs/s)")
        print(
            f"  one RQ job per ID:  {naive_seconds:7.2f} s ({args.ids / naive_seconds:,.0f} IDs/s)"
        )
        print(f"  ratio: {naive_seconds / slot_seconds:.0f}x  (aim: 60x or more)")
        empty()


if __name__ == "__main__":
    main()
