"""Planners in parallel processes, and a planner killed half way."""

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime

import pytest
from sqlalchemy import text

from service import create_app
from service.core import locks
from service.core.extensions import db
from service.core.models import IdTask
from service.dispatch.claimers import new_claimer_id
from service.dispatch.claims import claim
from service.planning.planner import EPOCH
from service.planning.reading import slot_grid
from service.planning.windows import plan_stored_task

from ..helpers import at, limit_id, loads, submit

pytestmark = pytest.mark.slow

NOW = at("2030-01-07 10:59:50")
WINDOW = at("2030-01-07 11:00")
NEXT_WINDOW = at("2030-01-07 11:15")
RPM = 50
PLANNERS = 8


def _plan_in_process(task_id, barrier):
    os.environ["RPM"] = str(RPM)
    app = create_app()
    with app.app_context():
        barrier.wait(timeout=60)
        plan_stored_task(task_id, now=NOW)


def plan_in_parallel(task_ids):
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(task_ids))
    processes = [context.Process(target=_plan_in_process, args=(t, barrier)) for t in task_ids]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0


@pytest.fixture
def planning_app(make_app):
    app = make_app(RPM=RPM)
    with app.app_context():
        yield app


def assigned_per_slot():
    rows = db.session.execute(
        text(
            "SELECT slot_start, count(*) FROM assignments WHERE status = 'pending' "
            "GROUP BY slot_start ORDER BY slot_start"
        )
    )
    return dict(rows.all())


def test_parallel_planners_fill_in_order_then_spread_evenly(planning_app):
    # Phase 1: 8 x 50 IDs fit below RPM: exactly the first 8 slots are full.
    plan_in_parallel([submit(range(t * 1000, t * 1000 + 50)) for t in range(PLANNERS)])
    window = loads(WINDOW, NEXT_WINDOW)
    assert sum(window.values()) == PLANNERS * 50
    assert list(window.values()) == [RPM] * PLANNERS
    assert assigned_per_slot() == window

    # Phase 2: 8 x 100 more overflow the window: every slot at RPM, then within one.
    plan_in_parallel([submit(range(t * 1000 + 100, t * 1000 + 200)) for t in range(PLANNERS)])
    window = loads(WINDOW, NEXT_WINDOW)
    assert len(window) == 15
    assert sum(window.values()) == PLANNERS * 150
    assert min(window.values()) >= RPM
    assert max(window.values()) - min(window.values()) <= 1
    assert assigned_per_slot() == window
    statuses = db.session.execute(text("SELECT DISTINCT status FROM id_tasks")).scalars().all()
    assert statuses == ["scheduled"]


KILLABLE_PLANNER = """
import os
from datetime import datetime
from service import create_app
from service.planning.windows import plan_stored_task
app = create_app()
with app.app_context():
    plan_stored_task({task_id}, now=datetime.fromisoformat("{now}"))
"""


def wait_for_copy(deadline: float) -> None:
    while time.monotonic() < deadline:
        with db.engine.connect() as conn:
            copying = conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE query LIKE 'COPY assignments%' AND state = 'active' "
                    "AND datname = current_database()"
                )
            ).scalar()
        if copying:
            return
        time.sleep(0.01)
    raise AssertionError("the planner never started writing")


def test_a_planner_killed_half_way_leaves_a_task_the_rerun_completes(planning_app):
    total = 300_000
    task_id = submit(range(1, total + 1))
    script = KILLABLE_PLANNER.format(task_id=task_id, now=NOW.isoformat())
    planner = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "RPM": str(RPM)})
    try:
        wait_for_copy(time.monotonic() + 60)
    finally:
        planner.send_signal(signal.SIGKILL)
        planner.wait()
    db.session.remove()
    assert db.session.execute(text("SELECT count(*) FROM assignments")).scalar() == 0
    assert db.session.get(IdTask, task_id).status == "planning"

    plan_stored_task(task_id, now=NOW)
    counts = db.session.execute(
        text(
            "SELECT count(*), count(DISTINCT position), count(DISTINCT user_id) "
            "FROM assignments WHERE task_id = :t"
        ),
        {"t": task_id},
    ).one()
    assert tuple(counts) == (total, total, total)
    assert sum(loads(WINDOW, NEXT_WINDOW).values()) == total
    assert db.session.get(IdTask, task_id).status == "scheduled"


def test_planning_reads_the_clock_after_it_holds_the_window_lock(make_app):
    app = make_app(SLOT_SECONDS=2, WINDOW_SLOTS=30, PLAN_LEAD_SECONDS=0.5)
    with app.app_context():
        task_id = submit(range(1, 6))
        grid = slot_grid()
        now = datetime.now(UTC)
        first_open = grid.slot_of(now) + grid.slot_length
        if (first_open - now).total_seconds() <= 1.0:
            first_open += grid.slot_length
        windows = {grid.window_of(now), grid.window_of(first_open)}
        with db.engine.connect() as other:  # another planner, busy in these windows
            for window in windows:
                number = (window - EPOCH) // grid.window_length
                other.execute(
                    text("SELECT pg_advisory_lock(:key)"),
                    {"key": locks.window_key(limit_id(), number)},
                )
            planner = threading.Thread(target=plan_in_thread, args=(app, task_id))
            planner.start()
            # Past the slot's lead: it has closed while the planner waited.
            time.sleep(max(0, (first_open - datetime.now(UTC)).total_seconds() - 0.3))
            other.execute(text("SELECT pg_advisory_unlock_all()"))
        planner.join(30)
        db.session.remove()
        slots = set(
            db.session.execute(
                text("SELECT slot_start FROM assignments WHERE task_id = :t"), {"t": task_id}
            ).scalars()
        )
    assert slots and first_open not in slots and min(slots) > first_open


def plan_in_thread(app, task_id: int) -> None:
    with app.app_context():
        plan_stored_task(task_id)


def test_a_claim_skips_rows_another_transaction_holds(make_app):
    app = make_app(RPM=10)
    with app.app_context():
        task_id = submit(range(1, 6))
        plan_stored_task(task_id, now=datetime(2026, 1, 5, 8, 59, 50, tzinfo=UTC))
        slot = db.session.get(IdTask, task_id).first_slot
        with db.engine.connect() as other:
            other.execute(
                text("SELECT 1 FROM assignments WHERE position < 2 FOR UPDATE")
            )  # held, not committed
            claimer = new_claimer_id()
            db.session.execute(text("SET LOCAL lock_timeout = '1s'"))  # waiting would fail
            batch = claim(limit_id(), slot, claimer, 10)
            other.rollback()
    assert [item.user_id for item in batch.claims] == [3, 4, 5]
