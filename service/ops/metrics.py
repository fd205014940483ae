"""Prometheus metrics: HTTP requests counted by route and status with their latency, and
the plan's and the queues' figures, read from PostgreSQL and Redis at each scrape.

Under gunicorn each worker process counts its own requests; with PROMETHEUS_MULTIPROC_DIR
set, every process writes its counts to files there and a scrape adds them up, whichever
worker answers it. Without it (tests, `flask run`: one process) the counts live in the
process's default registry. The plan's figures are never held in a process: PostgreSQL
and Redis have them, for every web process alike.
"""

from __future__ import annotations

import logging
import os
from bisect import bisect_right
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from redis.exceptions import RedisError
from rq import Queue
from rq_scheduler import Scheduler
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from service.core.extensions import db, probe_redis
from service.core.models import AssignmentStatus
from service.jobs import ALL_QUEUES, SLOTS_QUEUE
from service.planning.reading import plan_between

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
# A scrape that waits longer on a server reports it down rather than hanging.
SOURCE_TIMEOUT_SECONDS = 2
# Slot start lateness is shown over the slots of the last hour.
RECENT = timedelta(hours=1)
LATENESS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# Any other method a client sends is counted as "other": a label value per made-up method
# would let clients grow the series without bound. Paths are counted by their URL rule
# for the same reason.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "unmatched"

REQUESTS = Counter(
    "slotted_http_requests",
    "HTTP requests answered, by method, route (the URL rule) and status",
    ["method", "route", "status"],
)
REQUEST_SECONDS = Histogram(
    "slotted_http_request_duration_seconds",
    "Time to answer an HTTP request, by method and route",
    ["method", "route"],
)


def observe_request(method: str, route: str | None, status: int, seconds: float) -> None:
    method = method if method in METHODS else "other"
    route = route or UNMATCHED_ROUTE
    REQUESTS.labels(method, route, str(status)).inc()
    REQUEST_SECONDS.labels(method, route).observe(seconds)


def exposition() -> bytes:
    """What a scrape gets, in Prometheus's text format: the requests of every web
    process, then the plan's figures."""
    return generate_latest(_request_metrics()) + generate_latest(PlanCollector())


def _request_metrics() -> CollectorRegistry:
    if not os.environ.get(MULTIPROCESS_DIR):
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


def clear_multiprocess_dir() -> None:
    """Start the web's counts afresh: remove what processes of an earlier run wrote."""
    directory = os.environ.get(MULTIPROCESS_DIR)
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        for leftover in Path(directory).glob("*.db"):
            leftover.unlink()


def forget_process(pid: int) -> None:
    """A web process has exited: drop its live figures (its counts stay in the sums)."""
    if os.environ.get(MULTIPROCESS_DIR):
        multiprocess.mark_process_dead(pid)


class PlanCollector:
    """The plan's and the queues' figures, read at each scrape. A source that does not
    answer is reported by slotted_source_up 0, and the rest is still served."""

    def collect(self):
        up = GaugeMetricFamily(
            "slotted_source_up",
            "1 when this scrape could read the source, 0 when it could not",
            labels=["source"],
        )
        for source, read in (("postgresql", _database_figures), ("redis", _redis_figures)):
            try:
                families = list(read())
            except (SQLAlchemyError, RedisError):
                log.warning("metrics: could not read %s", source, exc_info=True)
                db.session.rollback()
                up.add_metric([source], 0)
                continue
            up.add_metric([source], 1)
            yield from families
        yield up


def _database_figures():
    db.session.execute(text(f"SET LOCAL statement_timeout = {SOURCE_TIMEOUT_SECONDS * 1000}"))
    yield _ids_by_status()
    yield from _recent_slots(datetime.now(UTC))
    yield from _current_window()
    db.session.rollback()  # read only; ends the transaction and its timeout


def _ids_by_status() -> GaugeMetricFamily:
    # The IDs still to run are counted on their partial indexes; the finished ones, which
    # grow with every task ever run, from the tasks' own counters rather than by
    # scanning every assignment at each scrape.
    row = db.session.execute(
        text(
            "SELECT"
            " (SELECT count(*) FROM assignments WHERE status = :pending),"
            " (SELECT count(*) FROM assignments WHERE status = :running),"
            " (SELECT count(*) FROM assignments WHERE status = :retrying),"
            " (SELECT coalesce(sum(done), 0) FROM id_tasks),"
            " (SELECT coalesce(sum(failed), 0) FROM id_tasks)"
        ),
        {
            "pending": AssignmentStatus.PENDING,
            "running": AssignmentStatus.RUNNING,
            "retrying": AssignmentStatus.RETRYING,
        },
    ).one()
    family = GaugeMetricFamily(
        "slotted_ids",
        "IDs by status: pending, running, retrying, done, failed (after every attempt)",
        labels=["status"],
    )
    statuses = (
        AssignmentStatus.PENDING,
        AssignmentStatus.RUNNING,
        AssignmentStatus.RETRYING,
        AssignmentStatus.DONE,
        AssignmentStatus.FAILED,
    )
    for status, count in zip(statuses, row):
        family.add_metric([status.value], count)
    return family


def _recent_slots(now: datetime):
    rows = db.session.execute(
        text(
            "SELECT extract(epoch FROM started_at - slot_start), late FROM slots "
            "WHERE slot_start > :since AND slot_start <= :now"
        ),
        {"since": now - RECENT, "now": now},
    ).all()
    yield GaugeMetricFamily(
        "slotted_late_slots",
        "Slots of the last hour that started late (or were queued after their start)",
        value=sum(1 for _, late in rows if late),
    )
    lateness = sorted(float(seconds) for seconds, _ in rows if seconds is not None)
    buckets = [(str(bound), bisect_right(lateness, bound)) for bound in LATENESS_BUCKETS]
    yield GaugeHistogramMetricFamily(
        "slotted_slot_start_lateness_seconds",
        "From each slot's start to its first claim, over the slots of the last hour",
        buckets=[*buckets, ("+Inf", len(lateness))],
        gsum_value=sum(lateness),
    )


def _current_window():
    [window] = plan_between(None, None, windows=1)["windows"]
    yield GaugeMetricFamily(
        "slotted_window_load", "IDs planned into the current window", value=window["load"]
    )
    yield GaugeMetricFamily(
        "slotted_window_capacity",
        "What the current window may take below RPM: RPM times its slots",
        value=window["capacity"],
    )


def _redis_figures():
    with probe_redis(SOURCE_TIMEOUT_SECONDS) as redis:
        depth = GaugeMetricFamily(
            "slotted_rq_queue_jobs", "Jobs waiting in each RQ queue", labels=["queue"]
        )
        for name in ALL_QUEUES:
            depth.add_metric([name], Queue(name, connection=redis).count)
        yield depth
        yield GaugeMetricFamily(
            "slotted_scheduled_slot_jobs",
            "Slot jobs waiting in rq-scheduler for their time: those of the slots starting "
            "within SCHEDULE_AHEAD_MINUTES (later slots get theirs as time passes)",
            value=Scheduler(queue_name=SLOTS_QUEUE, connection=redis).count(),
        )
