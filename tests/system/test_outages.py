"""Servers that go away under a running task: every process stays up, every ID is done
once. PostgreSQL and Redis of the tests' own are stopped and started for real; the
machine's PostgreSQL has its connections terminated."""

from __future__ import annotations

import logging
import subprocess
import time
from contextlib import contextmanager
from datetime import UTC, datetime

import psycopg
import pytest
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError as RedisDataError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import Queue, Worker
from rq.executions import Execution
from rq.job import Job
from sqlalchemy import text

from service.core import locks
from service.core.extensions import db, get_redis
from service.core.models import IdTask
from service.core.outages import Backoff, is_outage, keep_running
from service.dispatch import claimers
from service.dispatch.pacing import Clock
from service.dispatch.reconcile import reconcile
from service.dispatch.slot_runs import run_slot
from service.dispatch.worker import ClaimingWorker
from service.jobs import SLOTS_QUEUE, ServiceScheduler, get_queue, slot_job_id
from service.limits import store as limits
from service.limits.store import DEFAULT
from service.ops import devstack
from service.planning.windows import plan_stored_task

from ..downstream import Record, Server
from ..helpers import PAST, submit, times_processed
from ..processes import ROOT, free_port, run_flask, start, stop, wait_until
from ..servers import StoppablePostgres, StoppableRedis

HTTP_PROCESSOR = "workers.processors:http_request"

pytestmark = pytest.mark.slow

# One slot of 40 IDs a few seconds ahead, paced over 3.6 s; reconcile every 2 s.
SLOT = {
    "SLOT_SECONDS": 4,
    "WINDOW_SLOTS": 2,
    "PLAN_LEAD_SECONDS": 0.3,
    "RPM": 60,
    "RECONCILE_INTERVAL_SECONDS": 2,
}
IDS = range(1, 41)


@pytest.fixture(scope="module")
def own_postgres():
    # pgserver logs again as the interpreter exits, after pytest has closed its streams.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    server = StoppablePostgres(ROOT / "var" / "test" / "outage-postgres")
    upgraded = run_flask("db", "upgrade", DATABASE_URL=server.url)
    assert upgraded.returncode == 0, upgraded.stderr
    yield server
    server.stop()


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory):
    server = StoppableRedis(tmp_path_factory.mktemp("outage-redis"))
    yield server
    server.stop()


def _empty(app) -> None:
    with app.app_context():
        tables = ", ".join(db.metadata.tables)
        db.session.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
        db.session.commit()
        get_redis().flushdb()


@contextmanager
def stack(settings: dict, workers: int = 2, scheduler: bool = True):
    processes = {f"worker-{n}": start(["worker"], settings) for n in range(1, workers + 1)}
    if scheduler:
        processes["scheduler"] = start(["scheduler"], settings)
    try:
        yield processes
    finally:
        stop(processes.values())


def exited(processes: dict) -> dict:
    return {name: p.returncode for name, p in processes.items() if p.poll() is not None}


def task_status(task_id: int) -> str:
    return db.session.get(IdTask, task_id).status


def start_task_under_way() -> int:
    task_id = submit(IDS)
    plan_stored_task(task_id)
    wait_until(lambda: len(times_processed()) >= 8, 40, "the slot to be under way")
    return task_id


def finish_and_check(task_id: int, processes: dict, also: tuple[int, ...] = ()) -> None:
    wait_until(lambda: task_status(task_id) == "done", 90, "the task to be done")
    assert exited(processes) == {}
    assert times_processed() == dict.fromkeys([*IDS, *also], 1)


def test_a_postgres_restart_under_a_running_slot(make_app, own_postgres):
    settings = {**SLOT, "DATABASE_URL": own_postgres.url}
    app = make_app(**settings)
    _empty(app)
    with app.app_context(), stack(settings) as processes:
        task_id = start_task_under_way()
        db.session.remove()
        with _halted(own_postgres):
            time.sleep(3)
        assert exited(processes) == {}
        assert len(times_processed()) < len(IDS)
        finish_and_check(task_id, processes)


def test_every_connection_terminated_under_a_running_slot(make_app):
    app = make_app(**SLOT)
    with app.app_context(), stack(SLOT) as processes:
        task_id = start_task_under_way()
        killed = db.session.execute(
            text(
                "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).scalar()
        db.session.commit()
        assert killed >= 3  # a claimer's lock, and each process's session
        finish_and_check(task_id, processes)


@pytest.mark.parametrize("outage", ["restart", "pause", "flushall"])
def test_redis_away_under_a_running_slot(make_app, own_redis, outage):
    settings = {**SLOT, "REDIS_URL": own_redis.url}
    app = make_app(**settings)
    _empty(app)
    with app.app_context(), stack(settings) as processes:
        task_id = start_task_under_way()
        later = None
        if outage == "restart":  # it keeps nothing: the schedule is gone too
            own_redis.halt()
            time.sleep(3)
            own_redis.resume()
        elif outage == "pause":  # answering nobody, as a hung or failing-over Redis
            later = _submit_during_a_pause(app, own_redis, seconds=12)
        else:
            Redis.from_url(own_redis.url).flushall()
        if later is not None:
            wait_until(lambda: task_status(later) == "done", 90, "the later task to be done")
        finish_and_check(task_id, processes, also=(41, 42) if later else ())


def _submit_during_a_pause(app, own_redis, seconds: int) -> int:
    """A task posted while Redis answers nobody is stored and answered at once, not
    after the pause; its planning is queued by reconcile once Redis answers again."""
    Redis.from_url(own_redis.url).execute_command("CLIENT", "PAUSE", seconds * 1000, "ALL")
    asked = time.monotonic()
    answer = app.test_client().post(
        "/celery_ids_tasks/", json={"task_name": "during a pause", "ids": [41, 42]}
    )
    assert time.monotonic() - asked < seconds - 4
    assert (answer.status_code, answer.json["status"]) == (202, "received")
    time.sleep(max(0.0, seconds - (time.monotonic() - asked)))
    return answer.json["id"]


def test_a_worker_whose_database_went_away_between_jobs_keeps_working(make_app, own_postgres):
    settings = {**SLOT, "DATABASE_URL": own_postgres.url}
    app = make_app(**settings)
    _empty(app)
    with app.app_context():
        task_id = submit(IDS)
        plan_stored_task(task_id)
        slot = db.session.get(IdTask, task_id).first_slot
        db.session.remove()
        get_redis().flushdb()  # the worker starts idle: its only job comes below
    with app.app_context(), stack(settings, workers=1, scheduler=False) as processes:
        wait_until(lambda: Worker.count(connection=get_redis()) == 1, 60, "the worker to listen")
        with _halted(own_postgres):
            # Its slot job reaches the worker while PostgreSQL is away.
            get_queue(SLOTS_QUEUE).enqueue(
                "workers.slots.run_slot",
                slot.isoformat(),
                "default",
                job_id=slot_job_id("default", slot),
            )
            wait_until(lambda: get_queue(SLOTS_QUEUE).count == 0, 60, "the worker to take it")
            time.sleep(2)
            assert exited(processes) == {}
        assert reconcile()["slot jobs added"] == 1  # its job failed: run again, late
        finish_and_check(task_id, processes)


@contextmanager
def _halted(server: StoppablePostgres):
    """The server stopped for the block, and started again however the block ends."""
    server.halt()
    try:
        yield
    finally:
        server.resume()


def test_the_schedulers_reconcile_works_again_after_its_session_broke(rpm3, caplog):
    task_id = submit([1, 2])
    plan_stored_task(task_id)
    get_redis().flushdb()  # the schedule is gone: reconcile must rebuild it
    # The scheduler's session holds a connection in a transaction, which dies.
    pid = db.session.execute(text("SELECT pg_backend_pid()")).scalar()
    with psycopg.connect(_url(rpm3), autocommit=True) as other:
        other.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
    scheduler = ServiceScheduler(
        queue_name=SLOTS_QUEUE,
        connection=get_redis(),
        interval=1,
        maintenance=reconcile,
        maintenance_seconds=0,
    )
    scheduler.enqueue_jobs()
    assert "reconcile failed" in caplog.text
    assert scheduler.count() == 0
    assert scheduler.after_outage  # its next run spares gone claimers once
    scheduler.enqueue_jobs()
    assert scheduler.count() == 1
    assert not scheduler.after_outage


def _url(app) -> str:
    return app.config["DATABASE_URL"]


def test_with_redis_away_tasks_are_accepted_and_its_pages_answer_503(make_app):
    app = make_app(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", REDIS_TIMEOUT_SECONDS=1.0)
    client = app.test_client()
    accepted = client.post("/celery_ids_tasks/", json={"task_name": "t", "ids": [1, 2]})
    assert (accepted.status_code, accepted.json["status"]) == (202, "received")
    queues = client.get("/rq/0/data/queues.json")
    assert (queues.status_code, queues.headers["Retry-After"]) == (503, "1")
    assert "retry" in queues.json["message"]


def test_make_run_starts_again_a_process_that_exits(monkeypatch):
    launched = []

    def launch(name: str) -> subprocess.Popen:
        launched.append(name)
        if len(launched) == 3:
            raise devstack.Stop("SIGTERM")
        return subprocess.Popen(["true"])

    monkeypatch.setattr(devstack, "Backoff", lambda: Backoff(first=0.05))
    with pytest.raises(devstack.Stop):
        devstack._supervise({"worker-1": launch("worker-1")}, launch)
    assert launched == ["worker-1"] * 3


def test_processes_started_while_postgres_is_away_wait_for_it(make_app, own_postgres):
    settings = {**SLOT, "DATABASE_URL": own_postgres.url}
    app = make_app(**settings)
    _empty(app)
    own_postgres.halt()
    try:
        with stack(settings, workers=1) as processes:
            time.sleep(4)
            assert exited(processes) == {}
            own_postgres.resume()
            with app.app_context():
                task_id = submit([1, 2, 3])
                plan_stored_task(task_id)
                wait_until(lambda: task_status(task_id) == "done", 60, "the task to be done")
                assert exited(processes) == {}
                assert times_processed() == dict.fromkeys([1, 2, 3], 1)
    finally:
        own_postgres.resume()


@pytest.mark.parametrize("processor", ["http_request", "record_user"])
def test_a_slot_job_rides_out_its_connections_dropping_and_calls_each_id_once(make_app, processor):
    """Every connection of the job (its session, its claimer's lock) is cut mid-slot: it
    takes its lock again, records what it had called, and finishes the slot itself."""
    record = Record()
    with Server(record) as url:
        settings = {"SLOT_SECONDS": 1, "WINDOW_SLOTS": 5, "PLAN_LEAD_SECONDS": 0.2}
        if processor == "http_request":
            settings.update(ID_PROCESSOR=HTTP_PROCESSOR, PROCESSOR_HTTP_URL=url)
        app = make_app(**settings)
        cut = []

        def cut_every_connection_once(seconds: float) -> None:
            if not cut:
                time.sleep(0.3)  # the calls handed out so far end
                with psycopg.connect(app.config["DATABASE_URL"], autocommit=True) as other:
                    cut.append(
                        other.execute(
                            "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
                            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                        ).fetchone()[0]
                    )
            time.sleep(seconds)

        with app.app_context():
            task_id = submit([1, 2, 3, 4, 5, 6])
            plan_stored_task(task_id, now=PAST)
            slot = db.session.get(IdTask, task_id).first_slot
            run = run_slot(DEFAULT, slot, clock=Clock(sleep=cut_every_connection_once))
            db.session.remove()
            statuses = db.session.execute(text("SELECT status FROM assignments")).scalars()
            assert set(statuses) == {"done"}
            processed = times_processed()
    assert cut[0] >= 2  # its session and its claimer's lock
    assert run.done == 6 and run.handed_back == 0
    if processor == "http_request":
        assert {user_id: len(keys) for user_id, keys in record.keys().items()} == dict.fromkeys(
            range(1, 7), 1
        )
    else:
        assert processed == dict.fromkeys(range(1, 7), 1)


def test_a_claimer_keeps_a_lock_it_still_holds_and_retakes_one_it_lost(rpm3):
    task_id = submit([1])
    plan_stored_task(task_id, now=PAST)
    slot = db.session.get(IdTask, task_id).first_slot
    db.session.commit()
    with claimers.claiming(limits.find(DEFAULT).id, slot) as claimer:
        backend = claimer._holder.execute(text("SELECT pg_backend_pid()")).scalar()
        claimer.take_again()  # its connection answers: the very same lock, never let go
        assert claimer._holder.execute(text("SELECT pg_backend_pid()")).scalar() == backend
        with psycopg.connect(_url(rpm3), autocommit=True) as other:
            other.execute("SELECT pg_terminate_backend(%s, 5000)", (backend,))
            claimer.take_again()  # a new connection, the same claimer
            assert db.session.execute(
                text(locks.HELD_TWO_KEY_LOCKS), {"ns": locks.CLAIMER}
            ).scalars().all() == [claimer.id]
            # Another session holding the claimer's lock (a connection the server has
            # not seen die yet): not taken, said so, to be tried again.
            claimer.close()
            other.execute("SELECT pg_advisory_lock(%s, %s)", (locks.CLAIMER, claimer.id))
            with pytest.raises(claimers.ClaimerLockBusy):
                claimer.take_again()


def test_rq_heartbeats_skipped_while_redis_is_away_do_not_end_the_watch(app):
    dead = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    with app.app_context():
        worker = ClaimingWorker(
            [Queue(SLOTS_QUEUE, connection=get_redis())], connection=get_redis()
        )
    worker.connection = dead  # Redis went away while the job ran
    job = Job.create("workers.slots.run_slot", args=("2026-01-05T09:00:00+00:00",), connection=dead)
    worker.maintain_heartbeats(job, Execution("e1", job.id, connection=dead))  # no raise
    worker._shutdown_requested_date = datetime.now(UTC)  # as a stop signal's handler sets
    worker.set_shutdown_requested_date()  # called from that handler: no raise either


@pytest.mark.parametrize(
    ("error", "away"),
    [
        (RedisConnectionError("refused"), True),
        (RedisTimeoutError("timed out"), True),
        (ResponseError("READONLY You can't write against a read only replica."), True),
        (ResponseError("WRONGTYPE Operation against a key holding the wrong kind"), False),
        (RedisDataError("Invalid input of type: 'dict'"), False),
        (psycopg.OperationalError("connection failed"), True),
        (psycopg.errors.AdminShutdown("terminating connection"), True),
        (psycopg.errors.ReadOnlySqlTransaction("read-only transaction"), True),
        (psycopg.errors.UniqueViolation("duplicate key"), False),
        (ValueError("a bug"), False),
    ],
)
def test_what_counts_as_a_server_away(error, away):
    assert is_outage(error) is away


def test_keep_running_stops_on_a_stop_raised_inside_a_run():
    stopping = []

    def run() -> bool:
        stopping.append(True)
        raise RuntimeError("raised by a stop signal's handler")

    keep_running(run, "a loop", stopping=lambda: bool(stopping))
    assert stopping == [True]  # not started again, and not waited for


def test_make_run_waits_for_a_postgres_that_is_away(own_postgres):
    own_postgres.halt()
    waits = []

    def wait(seconds: float) -> None:
        waits.append(seconds)
        own_postgres.resume()

    try:
        devstack._wait_for_database(own_postgres.url, sleep=wait)
    finally:
        own_postgres.resume()
    assert waits == [1.0]  # refused once, then it answered
