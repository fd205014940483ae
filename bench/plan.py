"""Planning benchmark, run by hand: `DATABASE_URL=... REDIS_URL=... python bench/plan.py`.

Prints:
- a 1M-ID task from the POSTed text body to the committed plan, against a bare COPY of
  the same number of rows into the same assignments table in the same run (the ratio);
- the peak RSS of a planning process for 100k and for 10M IDs (and their ratio);
- a preview of the same body (POST /celery_ids_tasks/preview until its answer), beside it,
  and the peak RSS of a process previewing 100k and 10M IDs;
- the generator alone, in IDs per second.

It empties the tables of the database it is given: point it at a database of its own.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import flask_migrate
from sqlalchemy import text

from service import create_app
from service.core.extensions import db, raw_connection
from service.limits import store as limits
from service.planning.planner import distribute
from service.planning.windows import plan_stored_task
from service.tasks.services import submit_task

# Far enough ahead that every slot of the window is open whatever the clock says.
PLAN_AT = datetime(2030, 1, 7, 9, 59, 50, tzinfo=UTC)
SLOT = datetime(2030, 1, 7, 10, 0, tzinfo=UTC)


def empty_tables() -> None:
    db.session.execute(text("TRUNCATE users, id_tasks, task_id_chunks, assignments, slots"))
    db.session.commit()
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE assignments"))
        conn.execute(text("CHECKPOINT"))


def text_body(count: int) -> bytes:
    return "\n".join(str(1_000_000_000 + i) for i in range(count)).encode()


def pipeline_seconds(app, body: bytes) -> tuple[float, float]:
    """POST the body through the app, then plan it: seconds to stored, then to planned."""
    client = app.test_client()
    started = time.perf_counter()
    answer = client.post("/celery_ids_tasks/?task_name=bench", data=body, content_type="text/csv")
    assert answer.status_code == 202, answer.get_data(as_text=True)
    stored = time.perf_counter()
    plan_stored_task(answer.json["id"], now=PLAN_AT)
    return stored - started, time.perf_counter() - stored


def preview_seconds(app, body: bytes) -> float:
    """POST the body to the preview until it answers where the IDs would land."""
    client = app.test_client()
    started = time.perf_counter()
    answer = client.post("/celery_ids_tasks/preview", data=body, content_type="text/csv")
    assert answer.status_code == 200, answer.get_data(as_text=True)
    return time.perf_counter() - started


def bare_copy_seconds(count: int) -> float:
    """The same rows COPYed straight into assignments, as the planner writes them."""
    slot = SLOT.isoformat()
    limit_id = limits.find(limits.DEFAULT).id
    started = time.perf_counter()
    with (
        raw_connection().cursor() as cur,
        cur.copy(
            "COPY assignments (task_id, position, user_id, limit_id, slot_start, status, "
            "task_day) FROM STDIN"
        ) as copy,
    ):
        day = datetime.now(UTC).date()
        for position in range(count):
            copy.write_row((1, position, 1_000_000_000 + position, limit_id, slot, "pending", day))
    db.session.commit()
    return time.perf_counter() - started


# VmHWM, not getrusage: Linux keeps ru_maxrss across exec, so a child would report the
# size of the benchmark process that started it.
PLANNER_CHILD = """
import sys
from datetime import datetime
from service import create_app
from service.planning.windows import plan_stored_task
app = create_app()
with app.app_context():
    print(plan_stored_task(int(sys.argv[1]), now=datetime.fromisoformat(sys.argv[2])))
with open("/proc/self/status") as status:
    print(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
"""


def planner_peak_rss_mib(count: int) -> float:
    """Peak RSS of a fresh process planning a stored task of `count` IDs."""
    # The child prints the planner's own report, then its peak RSS in KiB.
    empty_tables()
    ids = (1_000_000_000 + i for i in range(count))
    task_id = submit_task("rss", ids).id
    report, peak = child_peak_rss_mib(PLANNER_CHILD, str(task_id), PLAN_AT.isoformat())
    assert f"planned={count}," in report, report
    return peak


def child_peak_rss_mib(script: str, *args: str) -> tuple[str, float]:
    """Run `script` in a fresh process: the line it prints before its peak RSS, and that."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=ROOT, check=True, capture_output=True, text=True
    )
    report, peak_kib = done.stdout.strip().splitlines()[-2:]
    return report, int(peak_kib) / 1024


PREVIEW_CHILD = """
import sys
from service import create_app
from service.planning.preview import preview_plan
app = create_app()
with app.app_context():
    count = int(sys.argv[1])
    print(preview_plan(1_000_000_000 + i for i in range(count))["total"])
with open("/proc/self/status") as status:
    print(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
"""


def preview_peak_rss_mib(count: int) -> float:
    """Peak RSS of a fresh process previewing `count` IDs handed to it as a stream."""
    total, peak = child_peak_rss_mib(PREVIEW_CHILD, str(count))
    assert int(total) == count, total
    return peak


def generator_ids_per_second(count: int) -> float:
    started = time.perf_counter()
    deque(distribute(range(count), [0] * 15, 120), maxlen=0)
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=1_000_000, help="IDs in the timed task")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rss-small", type=int, default=100_000)
    parser.add_argument("--rss-large", type=int, default=10_000_000)
    args = parser.parse_args()

    os.environ.setdefault("RPM", "120")
    app = create_app()
    with app.app_context():
        flask_migrate.upgrade(directory=str(ROOT / "migrations"))
        body = text_body(args.ids)
        posts, plans, copies, previews = [], [], [], []
        for _ in range(args.runs):
            empty_tables()
            copies.append(bare_copy_seconds(args.ids))
            empty_tables()
            previews.append(preview_seconds(app, body))
            post, plan = pipeline_seconds(app, body)
            posts.append(post)
            plans.append(plan)
        post, plan = statistics.median(posts), statistics.median(plans)
        pipeline = statistics.median(p + q for p, q in zip(posts, plans))
        copy = statistics.median(copies)
        print(f"{args.ids:,} IDs, median of {args.runs} runs")
        print(f"  POST of the text body, IDs stored:  {post:6.2f} s")
        print(f"  planning job, plan committed:       {plan:6.2f} s")
        print(f"  POSTed text body to committed plan: {pipeline:6.2f} s")
        print(f"  preview of the same body, answered: {statistics.median(previews):6.2f} s")
        print(f"  bare COPY of as many assignments:   {copy:6.2f} s")
        print(f"  ratio (bare COPY / whole pipeline): {copy / pipeline:6.2f}  (aim: 0.5 or more)")

        for title, measure in (
            ("the planning process", planner_peak_rss_mib),
            ("a process previewing a stream of IDs", preview_peak_rss_mib),
        ):
            small, large = measure(args.rss_small), measure(args.rss_large)
            print(f"peak RSS of {title}")
            print(f"  {args.rss_small:>11,} IDs: {small:7.1f} MiB")
            print(f"  {args.rss_large:>11,} IDs: {large:7.1f} MiB")
            print(f"  ratio: {large / small:.2f}  (aim: 1.2 or less)")
        empty_tables()

    rate = generator_ids_per_second(5_000_000)
    print(f"generator alone: {rate:,.0f} IDs/s")


if __name__ == "__main__":
    main()
