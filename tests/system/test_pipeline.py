"""The whole pipeline with real worker and scheduler processes, and its faults."""

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest
from rq import Queue, SimpleWorker
from sqlalchemy import text

from service.core.extensions import db, get_redis
from service.core.models import IdTask
from service.jobs import ALL_QUEUES
from service.planning.windows import plan_stored_task

from ..helpers import submit, times_processed
from ..processes import ROOT, kill_hard, start, stop, wait_until

pytestmark = pytest.mark.slow

# One-second slots in windows of five: the pipeline runs in seconds.
FAST = {"SLOT_SECONDS": 1, "WINDOW_SLOTS": 5, "PLAN_LEAD_SECONDS": 0.3}


def task_status(task_id: int) -> str:
    return db.session.get(IdTask, task_id).status


def test_post_plan_schedule_run_record(make_app):
    settings = {**FAST, "RPM": 3}
    app = make_app(**settings)
    # Two schedulers, as in a deployment with a standby: still each ID once.
    processes = [
        start(["worker"], settings),
        start(["worker"], settings),
        start(["scheduler"], settings),
        start(["scheduler"], settings),
    ]
    try:
        client = app.test_client()
        task_id = client.post(
            "/celery_ids_tasks/", json={"task_name": "e2e", "payload": "1,2,3,4,5,6,7,8"}
        ).json["id"]
        with app.app_context():
            wait_until(lambda: task_status(task_id) == "done", 60, "the task to be done")
            assert times_processed() == dict.fromkeys(range(1, 9), 1)
            slots = db.session.execute(text("SELECT load, done, started_at FROM slots")).all()
            assert sum(slot.load for slot in slots) == sum(slot.done for slot in slots) == 8
            assert all(slot.started_at for slot in slots)
    finally:
        stop(processes)
    task = client.get(f"/celery_ids_tasks/{task_id}/").json
    assert (task["status"], task["done"], task["task_status"]) == ("done", 8, True)
    assert {user["id"] for user in client.get("/users/").json} == set(range(1, 9))


# One slot of 40 IDs a few seconds ahead, paced over 3.6 s; a dead claim is detected, not
# waited for: CLAIM_TIMEOUT_SECONDS stays at its default of five minutes.
MID_SLOT = {"SLOT_SECONDS": 4, "WINDOW_SLOTS": 2, "PLAN_LEAD_SECONDS": 0.3, "RPM": 60}


def running_ids() -> int:
    return db.session.execute(
        text("SELECT count(*) FROM assignments WHERE status = 'running'")
    ).scalar()


def start_slot_under_way(app, settings) -> tuple[int, subprocess.Popen, subprocess.Popen]:
    task_id = submit(range(1, 41))
    plan_stored_task(task_id)
    scheduler, worker = start(["scheduler"], settings), start(["worker"], settings)
    wait_until(lambda: len(times_processed()) >= 8, 30, "the slot to be under way")
    return task_id, scheduler, worker


def test_a_worker_killed_mid_slot_is_replaced_at_once_and_repeats_nothing(make_app):
    settings = dict(MID_SLOT)  # and the default RECONCILE_INTERVAL_SECONDS
    app = make_app(**settings)
    with app.app_context():
        task_id, scheduler, worker = start_slot_under_way(app, settings)
        processes = [scheduler]
        try:
            kill_hard(worker)
            died = time.monotonic()
            assert len(times_processed()) < 40
            processes.append(start(["worker"], settings))
            wait_until(lambda: task_status(task_id) == "done", 30, "the task to be done")
            recovered = time.monotonic() - died
        finally:
            stop(processes)
        assert times_processed() == dict.fromkeys(range(1, 41), 1)
        assert recovered < 60, recovered


def test_reconcile_hands_back_a_dead_workers_ids_without_waiting(make_app):
    app = make_app(**MID_SLOT)
    with app.app_context():
        task_id, scheduler, worker = start_slot_under_way(app, MID_SLOT)
        stop([scheduler])
        kill_hard(worker)
        assert running_ids() > 0
        runner = app.test_cli_runner()
        # The dead worker's connection is gone within moments: no claim timeout to wait.
        wait_until(
            lambda: (
                runner.invoke(args=["plan", "reconcile"]).output.startswith("claims released: ")
                and running_ids() == 0
            ),
            5,
            "the claims to be released",
        )
        queues = [Queue(name, connection=get_redis()) for name in ALL_QUEUES]
        SimpleWorker(queues, connection=get_redis()).work(burst=True)
        db.session.remove()
        assert times_processed() == dict.fromkeys(range(1, 41), 1)
        assert task_status(task_id) == "done"


@pytest.mark.parametrize("shutdown", ["warm", "cold"])
def test_a_worker_stopped_mid_slot_hands_back_its_ids(make_app, shutdown):
    settings = dict(MID_SLOT)
    if shutdown == "cold":  # a processor stuck in a call: only a cold shutdown stops it
        settings["ID_PROCESSOR"] = "tests.processors:record_then_hang_on_20"
    app = make_app(**settings)
    with app.app_context():
        task_id, scheduler, worker = start_slot_under_way(app, settings)
        stop([scheduler])
        asked = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        if shutdown == "cold":
            time.sleep(1.5)  # RQ takes a second signal within a second for the same one
            worker.send_signal(signal.SIGTERM)
        worker.wait(15)
        assert time.monotonic() - asked < 10  # not the rest of the slot, nor a stuck call
        done_before = len(times_processed())
        assert 8 <= done_before < 40
        assert running_ids() == 0  # handed back before the worker exited
        if shutdown == "cold":
            return  # user 20 would hang the next worker too
        assert app.test_cli_runner().invoke(args=["plan", "reconcile"]).exit_code == 0
        queues = [Queue(name, connection=get_redis()) for name in ALL_QUEUES]
        SimpleWorker(queues, connection=get_redis()).work(burst=True)
        db.session.remove()
        assert times_processed() == dict.fromkeys(range(1, 41), 1)
        assert task_status(task_id) == "done"


def test_redis_losing_everything_loses_no_id(make_app):
    settings = {**FAST, "RPM": 2}
    app = make_app(**settings)
    with app.app_context():
        task_id = submit(range(1, 7))
        plan_stored_task(task_id)
        get_redis().flushall()
        assert app.test_cli_runner().invoke(args=["plan", "reconcile"]).exit_code == 0
        processes = [start(["worker"], settings), start(["scheduler"], settings)]
        try:
            wait_until(lambda: task_status(task_id) == "done", 60, "the task to be done")
        finally:
            stop(processes)
        assert times_processed() == dict.fromkeys(range(1, 7), 1)


SLOT_RUNNER = """
import sys
from datetime import datetime
from service import create_app
from service.dispatch.slot_runs import run_slot
from service.limits.store import DEFAULT
app = create_app()
with app.app_context():
    print("ready", flush=True)
    sys.stdin.readline()  # the barrier: both start once both are ready
    print(run_slot(DEFAULT, datetime.fromisoformat(sys.argv[1])).processed)
"""


def test_two_workers_share_one_big_slot_without_overlap(make_app):
    # Each call takes 0.1 s, so the slot lasts about a second: both runners take part.
    settings = {"RPM": "4000", "PACING": "false", "ID_PROCESSOR": "tests.processors:record_slowly"}
    app = make_app(RPM=4000, PACING=False, ID_PROCESSOR="tests.processors:record_slowly")
    with app.app_context():
        task_id = submit(range(1, 8001))
        plan_stored_task(task_id, now=datetime(2026, 1, 5, 8, 59, 50, tzinfo=UTC))
        slot = db.session.get(IdTask, task_id).first_slot
        env = {**os.environ, **settings}
        runners = [
            subprocess.Popen(
                [sys.executable, "-c", SLOT_RUNNER, slot.isoformat()],
                cwd=ROOT,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        for runner in runners:
            assert runner.stdout.readline().strip() == "ready"
        for runner in runners:
            runner.stdin.write("go\n")
            runner.stdin.flush()
        counts = [int(runner.communicate(timeout=120)[0].split()[-1]) for runner in runners]
        db.session.remove()
        assert sum(counts) == 4000
        assert all(count > 0 for count in counts), counts
        assert set(times_processed().values()) == {1}
        assert len(times_processed()) == 4000
