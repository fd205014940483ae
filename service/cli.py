"""Operator commands: `flask worker`, `flask scheduler` (and `flask db` from Flask-Migrate)."""

from __future__ import annotations

import click
from flask.cli import with_appcontext
from rq import Queue, Worker
from rq_scheduler import Scheduler

from .extensions import get_redis
from .queues import ALL_QUEUES, SLOTS_QUEUE

# rq-scheduler polls every 60 s by default, which would start slots up to a minute late.
SCHEDULER_INTERVAL_SECONDS = 1


@click.command("worker")
@click.option(
    "--queue",
    "-q",
    "queues",
    multiple=True,
    default=ALL_QUEUES,
    show_default=True,
    help="Queue to serve; repeat for several, earlier ones first.",
)
@click.option("--burst", is_flag=True, help="Quit once the queues are empty.")
@with_appcontext
def worker_command(queues: tuple[str, ...], burst: bool) -> None:
    """Run an RQ worker inside the app context."""
    redis = get_redis()
    worker = Worker([Queue(name, connection=redis) for name in queues], connection=redis)
    worker.work(burst=burst)


@click.command("scheduler")
@click.option("--burst", is_flag=True, help="Move the due jobs once, then quit.")
@with_appcontext
def scheduler_command(burst: bool) -> None:
    """Run rq-scheduler, polling every second."""
    scheduler = Scheduler(
        queue_name=SLOTS_QUEUE, connection=get_redis(), interval=SCHEDULER_INTERVAL_SECONDS
    )
    scheduler.run(burst=burst)


def init_app(app) -> None:
    app.cli.add_command(worker_command)
    app.cli.add_command(scheduler_command)
