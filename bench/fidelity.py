"""Plan fidelity, run by hand: `DATABASE_URL=... REDIS_URL=... python bench/fidelity.py`.

Runs the real stack (two `flask worker` processes and `flask scheduler`) with 2-s slots in
windows of 15, the HTTP processor pointed at a local server that notes when each ID
arrives, and compares what the downstream received with the plan, slot by slot:

1. calm: a `spread` task larger than a window, a `defer` task, and a task planned when
   its window has one slot left; nothing fails;
2. faults: more tasks, with Redis flushed and a worker killed (kill -9) mid-slot; a
   fresh worker takes its place.

For each phase it prints, per aligned 2-s slot, the requests received against the plan,
the largest excess over the planned load, and the share of IDs that arrived inside their
planned slot; for the faults, the time from the worker's death until every ID it held
was done. It empties the tables and the Redis database it is given: use ones of its own.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


import flask_migrate
from sqlalchemy import text

from service import create_app
from service.core.extensions import db, get_redis
from service.planning.windows import plan_stored_task
from service.tasks.services import submit_task
from tests.downstream import Record, Server
from tests.processes import kill_hard, start, stop, wait_until

SLOT = 2
WINDOW_SLOTS = 15
RPM = 20  # IDs per 2-s slot: ten requests a second at the plan's pace
SETTINGS = {
    "SLOT_SECONDS": SLOT,
    "WINDOW_SLOTS": WINDOW_SLOTS,
    "RPM": RPM,
    "PLAN_LEAD_SECONDS": 0.5,
    "ID_PROCESSOR": "workers.processors:http_request",
}


def scalar(sql: str, **params):
    db.session.remove()
    return db.session.execute(text(sql), params).scalar()


def settle(condition, timeout: float, what: str) -> None:
    """Wait for `condition`, going on without it after `timeout`: a phase that does not
    settle is reported all the same, its shortfall being what the run found."""
    with contextlib.suppress(AssertionError):
        wait_until(condition, timeout, what)


def wait_for_window_with_open_slots(count: int) -> None:
    """Sleep until the current window has exactly `count` slots left that open."""
    window = SLOT * WINDOW_SLOTS
    while True:
        into = time.time() % window
        left = (window - into) // SLOT  # slots starting after now
        if left == count and (SLOT - into % SLOT) > 1.0:
            return
        time.sleep(0.05)


def submit_and_plan(name: str, ids, overflow: str) -> int:
    task = submit_task(name, ids, overflow)
    plan_stored_task(task.id)  # at once, so that the moment is the bench's
    return task.id


def plan_by_id(task_ids: list[int]) -> dict[int, float]:
    rows = db.session.execute(
        text("SELECT user_id, slot_start FROM assignments WHERE task_id = ANY(:t)"),
        {"t": task_ids},
    )
    return {user_id: slot.timestamp() for user_id, slot in rows}


def report(title: str, task_ids: list[int], since: float, record: Record) -> None:
    db.session.remove()
    plan = plan_by_id(task_ids)
    arrivals = [(t, user_id) for t, user_id, _, _ in record.calls if user_id in plan]
    planned = Counter(plan.values())
    received = Counter(t // SLOT * SLOT for t, _ in arrivals)
    inside = sum(1 for t, user_id in arrivals if plan[user_id] <= t < plan[user_id] + SLOT)
    repeats = len(arrivals) - len({user_id for _, user_id in arrivals})
    print(f"\n{title}: {len(plan)} IDs planned, {len(arrivals)} requests received")
    print("  slot (s after start)  planned  received")
    for slot in sorted(set(planned) | set(received)):
        mark = "  <- above plan + 1" if received[slot] > planned[slot] + 1 else ""
        print(f"  {slot - since:9.0f}            {planned[slot]:5d}  {received[slot]:8d}{mark}")
    excess = max(received[slot] - planned[slot] for slot in set(planned) | set(received))
    print(f"  largest excess over the planned load: {excess}")
    print(f"  IDs arrived inside their planned slot: {inside / max(1, len(arrivals)):.2%}")
    print(f"  requests repeated: {repeats}")


def calm_phase() -> list[int]:
    tasks = [
        submit_and_plan("spread", range(1, 401), "spread"),
        submit_and_plan("defer", range(1001, 1201), "defer"),
    ]
    wait_for_window_with_open_slots(1)
    tasks.append(submit_and_plan("one slot left", range(2001, 2401), "spread"))
    return tasks


def faults_phase(settings: dict, workers: list) -> tuple[list[int], float]:
    tasks = [
        submit_and_plan("spread", range(5001, 5301), "spread"),
        submit_and_plan("defer", range(6001, 6201), "defer"),
    ]
    first_slot = min(plan_by_id(tasks).values())
    time.sleep(max(0, first_slot + 3 - time.time()))
    get_redis().flushall()
    print("\nRedis flushed")
    time.sleep(4.3)
    held = db.session.execute(
        text("SELECT task_id, position FROM assignments WHERE status = 'running'")
    ).all()
    kill_hard(workers.pop(0))
    died = time.monotonic()
    print(f"a worker killed while {len(held)} IDs were claimed")
    workers.append(start(["worker"], settings))
    db.session.remove()

    def held_done() -> bool:
        return (
            not held
            or scalar(
                "SELECT count(*) FROM assignments WHERE (task_id, position) IN "
                "(SELECT * FROM unnest(CAST(:t AS bigint[]), CAST(:p AS int[]))) "
                "AND status <> 'done'",
                t=[row.task_id for row in held],
                p=[row.position for row in held],
            )
            == 0
        )

    settle(held_done, 120, "every ID the killed worker held done")
    return tasks, time.monotonic() - died


def main() -> None:
    record = Record()
    with Server(record) as url:
        settings = {**SETTINGS, "PROCESSOR_HTTP_URL": url}
        os.environ.update({name: str(value) for name, value in settings.items()})
        with create_app().app_context():
            measure(settings, record)


def measure(settings: dict, record: Record) -> None:
    flask_migrate.upgrade(directory=str(ROOT / "migrations"))
    # The default limit goes too: recorded again from these settings, its URL names this
    # run's downstream (one naming an earlier run's is held, outside its prefix).
    db.session.execute(
        text("TRUNCATE users, id_tasks, task_id_chunks, assignments, slots, settings, limits")
    )
    db.session.commit()
    get_redis().flushdb()
    workers = [start(["worker"], settings), start(["worker"], settings)]
    scheduler = start(["scheduler"], settings)
    try:
        since = time.time() // SLOT * SLOT
        calm = calm_phase()
        settle(all_done, 300, "the calm phase done")
        report("calm", calm, since, record)

        since = time.time() // SLOT * SLOT
        faults, recovery = faults_phase(settings, workers)
        settle(all_done, 300, "the faults phase done")
        report("faults (Redis flushed, a worker killed)", faults, since, record)
        print(f"  from the worker's death to every ID it held done: {recovery:.1f} s")
    finally:
        stop([scheduler, *workers])


def all_done() -> bool:
    return scalar("SELECT count(*) FROM assignments WHERE status <> 'done'") == 0


if __name__ == "__main__":
    main()
