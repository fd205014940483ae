"""The operator commands, run through Flask's CLI runner."""

from datetime import UTC, datetime, timedelta

from alembic.script import ScriptDirectory
from flask import current_app
from rq import Queue
from rq.job import Job
from rq_scheduler import Scheduler
from sqlalchemy import text

from service.extensions import db, get_redis
from service.queues import PLANNING_QUEUE, SLOTS_QUEUE


def test_worker_burst_runs_the_queued_planning_job(app, client, runner):
    task_id = client.post("/celery_ids_tasks/", json={"task_name": "t", "ids": [1]}).json["id"]
    result = runner.invoke(args=["worker", "--burst", "--queue", PLANNING_QUEUE])
    assert result.exit_code == 0, result.output
    with app.app_context():
        job = Job.fetch(f"plan-{task_id}", connection=get_redis())
        assert job.is_finished
        assert Queue(PLANNING_QUEUE, connection=get_redis()).count == 0


def test_scheduler_burst_moves_due_jobs_to_their_queue(app, runner):
    with app.app_context():
        scheduler = Scheduler(queue_name=SLOTS_QUEUE, connection=get_redis())
        scheduler.enqueue_at(datetime.now(UTC) - timedelta(seconds=1), print, "due")
        scheduler.enqueue_at(datetime.now(UTC) + timedelta(hours=1), print, "later")
    result = runner.invoke(args=["scheduler", "--burst"])
    assert result.exit_code == 0, result.output
    with app.app_context():
        assert Queue(SLOTS_QUEUE, connection=get_redis()).count == 1
        assert len(list(Scheduler(connection=get_redis()).get_jobs())) == 1


def test_db_upgrade_is_idempotent_and_leaves_the_schema_at_head(app, runner):
    result = runner.invoke(args=["db", "upgrade"])
    assert result.exit_code == 0, result.output
    with app.app_context():
        heads = ScriptDirectory.from_config(
            current_app.extensions["migrate"].migrate.get_config()
        ).get_heads()
        version = db.session.execute(text("SELECT version_num FROM alembic_version")).scalar()
    assert [version] == heads
