"""Prometheus metrics: HTTP requests counted by route and status with their latency, and
the plan's figures (one series per limit) and the queues', read from PostgreSQL and
Redis at each scrape.

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
from collections import defaultdict
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
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from redis.exceptions import RedisError
from rq import Queue
from rq_scheduler import Scheduler
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from service.core.extensions import db, probe_redis
from service.core.models import AssignmentStatus
from service.jobs import ALL_QUEUES, SLOTS_QUEUE
from service.limits import learning
from service.limits.store import DEFAULT, find
from service.planning.reading import slot_grid

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
    find(DEFAULT)  # recorded the first time it is needed, so that it always has its series
    limits = db.session.execute(LIMITS).all()
    names = {limit.id: limit.name for limit in limits}
    now = datetime.now(UTC)
    yield _ids_by_status(names)
    yield from _recent_slots(names, now)
    yield from _current_window(limits, now)
    yield from _learned_rates(limits)
    db.session.rollback()  # read only; ends the transaction and its timeout


# Every figure below is one series per limit, read for all limits by one grouped statement.
LIMITS = text(
    "SELECT l.id, l.name, l.rpm, l.adaptive, r.learned_rpm, "
    "  coalesce(r.refusals, 0) AS refusals, coalesce(e.replans, 0) AS replans, "
    "  coalesce(e.moved, 0) AS moved "
    "FROM limits AS l LEFT JOIN learned_rates AS r ON r.limit_id = l.id "
    "LEFT JOIN (SELECT limit_id, count(*) AS replans, sum(moved) AS moved "
    "  FROM limit_events GROUP BY limit_id) AS e ON e.limit_id = l.id "
    "ORDER BY l.name"
)
# The IDs still to run are counted on their partial indexes, one branch per status; the
# finished ones, which grow with every task ever run, from the tasks' own counters rather
# than by scanning every assignment at each scrape.
IDS_BY_STATUS = text(
    "SELECT limit_id, status, count(*) FROM assignments WHERE status = :pending "
    "GROUP BY limit_id, status "
    "UNION ALL SELECT limit_id, status, count(*) FROM assignments WHERE status = :running "
    "GROUP BY limit_id, status "
    "UNION ALL SELECT limit_id, status, count(*) FROM assignments WHERE status = :retrying "
    "GROUP BY limit_id, status "
    "UNION ALL SELECT limit_id, CAST(:done AS varchar), sum(done) FROM id_tasks "
    "GROUP BY limit_id "
    "UNION ALL SELECT limit_id, CAST(:failed AS varchar), sum(failed) FROM id_tasks "
    "GROUP BY limit_id"
)
RECENT_SLOTS = text(
    "SELECT limit_id, extract(epoch FROM started_at - slot_start) AS lateness, late "
    "FROM slots WHERE slot_start > :since AND slot_start <= :now"
)
WINDOW_LOADS = text(
    "SELECT limit_id, sum(load) FROM slots WHERE slot_start >= :start AND slot_start < :end "
    "GROUP BY limit_id"
)
STATUSES = (
    AssignmentStatus.PENDING,
    AssignmentStatus.RUNNING,
    AssignmentStatus.RETRYING,
    AssignmentStatus.DONE,
    AssignmentStatus.FAILED,
)


def _ids_by_status(names: dict[int, str]) -> GaugeMetricFamily:
    params = {status.value: status for status in STATUSES}
    counts = {(limit, status): n for limit, status, n in db.session.execute(IDS_BY_STATUS, params)}
    family = GaugeMetricFamily(
        "slotted_ids",
        "IDs by limit and status: pending, running, retrying, done, failed (after every attempt)",
        labels=["limit", "status"],
    )
    for limit_id, name in names.items():
        for status in STATUSES:
            family.add_metric([name, status.value], counts.get((limit_id, status.value), 0))
    return family


def _recent_slots(names: dict[int, str], now: datetime):
    by_limit = defaultdict(list)
    for row in db.session.execute(RECENT_SLOTS, {"since": now - RECENT, "now": now}):
        by_limit[row.limit_id].append(row)
    late = GaugeMetricFamily(
        "slotted_late_slots",
        "Slots of the last hour that started late (or were queued after their start)",
        labels=["limit"],
    )
    lateness = GaugeHistogramMetricFamily(
        "slotted_slot_start_lateness_seconds",
        "From each slot's start to its first claim, over the slots of the last hour",
        labels=["limit"],
    )
    for limit_id, name in names.items():
        rows = by_limit[limit_id]
        late.add_metric([name], sum(1 for row in rows if row.late))
        seconds = sorted(float(row.lateness) for row in rows if row.lateness is not None)
        lateness.add_metric([name], _buckets(seconds), sum(seconds))
    yield late
    yield lateness


def _buckets(seconds: list[float]) -> list[tuple[str, int]]:
    """Cumulative counts of the sorted `seconds` by LATENESS_BUCKETS, then +Inf."""
    counted = [(str(bound), bisect_right(seconds, bound)) for bound in LATENESS_BUCKETS]
    return [*counted, ("+Inf", len(seconds))]


def _current_window(limits, now: datetime):
    grid = slot_grid()
    start = grid.window_of(now)
    params = {"start": start, "end": grid.next_window(start)}
    loads = dict(db.session.execute(WINDOW_LOADS, params).all())
    load = GaugeMetricFamily(
        "slotted_window_load", "IDs planned into the current window", labels=["limit"]
    )
    capacity = GaugeMetricFamily(
        "slotted_window_capacity",
        "What the current window may take: the slot capacity (the learned rate, else RPM) "
        "times its slots",
        labels=["limit"],
    )
    for limit in limits:
        load.add_metric([limit.name], loads.get(limit.id, 0))
        capacity.add_metric([limit.name], _capacity(limit) * grid.window_slots)
    yield load
    yield capacity


def _capacity(limit) -> int:
    return learning.capacity(limit.rpm, limit.learned_rpm)


def _learned_rates(limits):
    families = {
        "rpm": GaugeMetricFamily(
            "slotted_limit_rpm", "The limit's configured RPM", labels=["limit"]
        ),
        "learned": GaugeMetricFamily(
            "slotted_limit_learned_rpm",
            "The limit's slot capacity: its learned rate, or its RPM while nothing is learned",
            labels=["limit"],
        ),
        "adaptive": GaugeMetricFamily(
            "slotted_limit_adaptive",
            "1 when refusals lower the limit's learned rate, 0 when they are only retried",
            labels=["limit"],
        ),
        "refusals": CounterMetricFamily(
            "slotted_limit_refusals", "Refusals by the limit's downstream", labels=["limit"]
        ),
        "replans": CounterMetricFamily(
            "slotted_limit_replans",
            "Changes of the limit's learned rate, each re-planning its slots not yet started",
            labels=["limit"],
        ),
        "moved": CounterMetricFamily(
            "slotted_limit_replanned_ids", "IDs moved by the limit's re-plans", labels=["limit"]
        ),
    }
    for limit in limits:
        values = {
            "rpm": limit.rpm,
            "learned": _capacity(limit),
            "adaptive": int(limit.adaptive),
            "refusals": limit.refusals,
            "replans": limit.replans,
            "moved": limit.moved,
        }
        for key, family in families.items():
            family.add_metric([limit.name], values[key])
    yield from families.values()


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
