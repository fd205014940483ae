"""Calls to a 200-ms downstream, run by hand:
`DATABASE_URL=... REDIS_URL=... python bench/downstream.py [RPM ...]`.

Runs the real stack (four `flask worker` processes and `flask scheduler`) with the HTTP
processor against a local server that answers every call after 200 ms, at RPM 600, 6,000
and 60,000 scaled to 4-s slots (40, 400 and 4,000 IDs a slot, three slots each), first
with the service's design (calls at their turns from a pool of PROCESSOR_CONCURRENCY,
helper jobs for a slot that runs behind), then, in the same run, with the sequential
design (one call at a time per slot job, no helpers). For each it prints the share of
IDs that arrived inside their planned slot, the p99 of how far an arrival was from its
turn, the most calls in flight and the connections the server saw opened.

It empties the tables and the Redis database it is given: use ones of its own.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import flask_migrate
from sqlalchemy import text

from service import create_app
from service.core.extensions import db, get_redis
from service.dispatch.pacing import step_of
from service.planning.windows import plan_stored_task
from service.tasks.services import submit_task
from tests.downstream import Record, Server
from tests.helpers import percentile
from tests.processes import start, stop

SLOT = 4
SLOTS = 3
LATENCY = 0.2
RATES = (600, 6_000, 60_000)  # per minute
DESIGNS = {
    "concurrent": {"PROCESSOR_CONCURRENCY": 64, "MAX_HELPERS_PER_SLOT": 4},
    "sequential": {"PROCESSOR_CONCURRENCY": 1, "MAX_HELPERS_PER_SLOT": 0},
}


def reset() -> None:
    # The default limit goes too: recorded again from this run's settings, its URL names
    # this run's downstream (a limit naming an earlier one is held, outside its prefix).
    db.session.execute(
        text("TRUNCATE users, id_tasks, task_id_chunks, assignments, slots, settings, limits")
    )
    db.session.commit()
    get_redis().flushdb()


def planned_turns(task_id: int, per_slot: int) -> dict[int, float]:
    rows = db.session.execute(
        text(
            "SELECT user_id, slot_start, row_number() OVER "
            "  (PARTITION BY slot_start ORDER BY position) - 1 AS place "
            "FROM assignments WHERE task_id = :t"
        ),
        {"t": task_id},
    )
    step = step_of(SLOT, per_slot)
    return {row.user_id: (row.slot_start.timestamp(), row.place * step) for row in rows}


def run(rate: int, design: dict) -> dict:
    per_slot = rate * SLOT // 60
    record = Record(latency=LATENCY)
    with Server(record) as url:
        settings = {
            "SLOT_SECONDS": SLOT,
            "WINDOW_SLOTS": 15,
            "PLAN_LEAD_SECONDS": 0.5,
            "RPM": per_slot,
            "ID_PROCESSOR": "workers.processors:http_request",
            "PROCESSOR_HTTP_URL": url,
            "PROCESSOR_HTTP_TIMEOUT": 30,
            **design,
        }
        app = create_app_with(settings)
        with app.app_context():
            reset()
            processes = [start(["scheduler"], settings)]
            processes += [start(["worker"], settings) for _ in range(4)]
            try:
                total = per_slot * SLOTS
                task = submit_task("bench", range(1, total + 1), "defer")
                plan_stored_task(task.id, now=datetime.now(UTC) + timedelta(seconds=4))
                turns = planned_turns(task.id, per_slot)
                last_slot = max(slot for slot, _ in turns.values())
                deadline = last_slot + SLOT + 60
                while len(record.calls) < total and time.time() < deadline:
                    time.sleep(0.5)
            finally:
                stop(processes)
    inside, offsets = 0, []
    for arrived, user_id, _, _ in record.calls:
        slot, turn = turns[user_id]
        inside += slot <= arrived < slot + SLOT
        offsets.append(abs(arrived - slot - turn))
    return {
        "calls": len(record.calls),
        "of": total,
        "inside": inside / total,
        "p99": percentile(offsets, 0.99) if offsets else float("nan"),
        "in_flight": record.most_in_flight,
        "connections": record.connections,
    }


def create_app_with(settings: dict):
    os.environ.update({name: str(value) for name, value in settings.items()})
    return create_app()


def main() -> None:
    with create_app().app_context():
        flask_migrate.upgrade(directory=str(ROOT / "migrations"))
    print(f"4-s slots, {SLOTS} slots a run, downstream answering in {LATENCY * 1000:.0f} ms")
    print(
        f"{'RPM':>7} {'design':>11} {'calls':>11} {'inside slot':>12} "
        f"{'p99 from turn':>14} {'in flight':>10} {'connections':>12}"
    )
    rates = [int(arg) for arg in sys.argv[1:]] or RATES
    for rate in rates:
        for name, design in DESIGNS.items():
            figures = run(rate, design)
            print(
                f"{rate:>7} {name:>11} {figures['calls']:>5}/{figures['of']:<5} "
                f"{figures['inside']:>11.1%} {figures['p99']:>13.2f}s "
                f"{figures['in_flight']:>10} {figures['connections']:>12}",
                flush=True,
            )


if __name__ == "__main__":
    main()
