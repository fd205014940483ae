"""Re-planning a limit with a million pending IDs, run by hand:
`DATABASE_URL=... REDIS_URL=... .venv/bin/python -m bench.replan [--ids 1000000]`.

Plans a deferred task of N IDs into a limit of RPM 1,000 (60-s slots: 1,000 slots), then
lowers its learned rate to 700 and re-plans it, while a second process plans small
tasks into the same limit every 0.2 s and notes how long each took from its start to its
commit (a planner waits for the window locks the re-plan holds). Prints the re-plan's
time, its transactions and the longest of them, the IDs it moved, and the small tasks'
planning times (median, p99, worst) during the re-plan beside the same measured before
it, as the baseline of the same run. Then the same for a rise back to 1,000.

It empties the tables of the database it is given: point it at a database of its own.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import flask_migrate
from sqlalchemy import text

from service import create_app
from service.core.extensions import db
from service.limits import services
from service.limits import store as limits
from service.planning.replan import replan_limit
from service.planning.windows import plan_stored_task
from service.tasks.services import submit_task
from tests.helpers import percentile

# Far enough ahead that every slot is open whatever the clock says.
PLAN_AT = datetime(2030, 1, 7, 9, 59, 50, tzinfo=UTC)
RPM = 1000
SMALL_EVERY_SECONDS = 0.2


def empty_tables() -> None:
    db.session.execute(
        text(
            "TRUNCATE users, id_tasks, task_id_chunks, assignments, slots, limits, "
            "learned_rates, limit_events CASCADE"
        )
    )
    db.session.commit()


def small_plans(app, stop: threading.Event, seconds: list[float]) -> None:
    """A task of 10 IDs planned into the limit every SMALL_EVERY_SECONDS, each one's
    planning time noted."""
    with app.app_context():
        number = 0
        while not stop.is_set():
            number += 1
            task = submit_task(f"small-{number}", range(1, 11), "defer", None, "bench")
            started = time.perf_counter()
            plan_stored_task(task.id, now=PLAN_AT)
            seconds.append(time.perf_counter() - started)
            stop.wait(SMALL_EVERY_SECONDS)


def measured(app, action) -> tuple[object, list[float]]:
    """What `action` returns, and the small tasks' planning times while it ran."""
    stop, seconds = threading.Event(), []
    beside = threading.Thread(target=small_plans, args=(app, stop, seconds))
    beside.start()
    try:
        outcome = action()
    finally:
        stop.set()
        beside.join()
    return outcome, seconds


def change_rate(limit_id: int, to: int | None, kind: str) -> int:
    event = limits.new_event(limit_id, kind, "bench", RPM, to or RPM)
    limits.set_learned(limit_id, to, None, event)
    db.session.commit()
    return event


def figures(seconds: list[float]) -> str:
    if not seconds:
        return "none"
    return (
        f"{len(seconds)} plans: median {statistics.median(seconds) * 1000:.1f} ms, "
        f"p99 {percentile(seconds, 0.99) * 1000:.1f} ms, worst {max(seconds) * 1000:.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=1_000_000)
    args = parser.parse_args()
    app = create_app()
    with app.app_context():
        flask_migrate.upgrade()
        empty_tables()
        services.create_limit({"name": "bench", "rpm": RPM})
        limit_id = limits.find("bench").id
        task = submit_task("big", range(1, args.ids + 1), "defer", None, "bench")
        started = time.perf_counter()
        plan_stored_task(task.id, now=PLAN_AT)
        print(f"{args.ids:,} IDs planned at {RPM} a slot in {time.perf_counter() - started:.1f} s")
        _, before = measured(app, lambda: time.sleep(3))
        print(f"baseline, small tasks planned beside nothing: {figures(before)}")
        for kind, to in (("lowered", 700), ("raised", None)):
            event = change_rate(limit_id, to, kind)
            started = time.perf_counter()
            outcome, beside = measured(app, lambda e=event: replan_limit(limit_id, e, PLAN_AT))
            took = time.perf_counter() - started
            print(
                f"{kind} to {to or RPM}: re-plan of {outcome.placed:,} IDs in {took:.1f} s, "
                f"{outcome.moved:,} moved, {outcome.transactions} transactions, the longest "
                f"{outcome.longest_seconds * 1000:.0f} ms"
            )
            print(f"  small tasks planned during it: {figures(beside)}")
            last = db.session.scalar(
                text("SELECT last_slot FROM id_tasks WHERE id = :t"), {"t": task.id}
            )
            print(f"  the big task's last slot: {last.isoformat()}")


if __name__ == "__main__":
    main()
