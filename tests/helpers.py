"""Helpers shared by the tests and the benchmarks: moments, submitting and planning, reading
the outcome, percentiles."""

import asyncio
from datetime import UTC, datetime, timedelta

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from service.core.extensions import db, get_redis
from service.limits import services
from service.limits import store as limits
from service.tasks.services import submit_task


def at(moment: str) -> datetime:
    return datetime.fromisoformat(moment).replace(tzinfo=UTC)


def minute(m: int) -> datetime:
    """A slot of the window the planning tests plan into: 2030-01-07 10:00 plus `m` minutes."""
    return at("2030-01-07 10:00") + timedelta(minutes=m)


def submit(ids, overflow=None, name="t", not_before=None, limit=None) -> int:
    return submit_task(name, ids, overflow, not_before, limit).id


def slots_by_id(task_id: int) -> dict[int, datetime]:
    rows = db.session.execute(
        text("SELECT user_id, slot_start FROM assignments WHERE task_id = :t"), {"t": task_id}
    )
    return dict(rows.all())


def limit_id(name: str = limits.DEFAULT) -> int:
    return limits.find(name).id


def loads(start: datetime, end: datetime, limit: str = limits.DEFAULT) -> dict[datetime, int]:
    """The loads of a limit's slots in [start, end)."""
    rows = db.session.execute(
        text(
            "SELECT slot_start, load FROM slots "
            "WHERE limit_id = :l AND slot_start >= :s AND slot_start < :e ORDER BY slot_start"
        ),
        {"l": limit_id(limit), "s": start, "e": end},
    )
    return dict(rows.all())


def set_load(slot: datetime, load: int, limit: str = limits.DEFAULT) -> None:
    db.session.execute(
        text("INSERT INTO slots (limit_id, slot_start, load) VALUES (:i, :s, :l)"),
        {"i": limit_id(limit), "s": slot, "l": load},
    )
    db.session.commit()


def add_limit(name: str, rpm: int, processor: str = limits.DEFAULT_PROCESSOR, **options) -> int:
    """A limit made as POST /limits/ makes it; returns its id."""
    services.create_limit({"name": name, "rpm": rpm, "processor": processor, "options": options})
    return limit_id(name)


def just_before_a_window(ahead: timedelta) -> datetime:
    """A planning time 10 s before a quarter-hour window at least `ahead` from now, so
    that the whole window is open to it whatever the clock says."""
    moment = datetime.now(UTC) + ahead
    window = moment.replace(minute=moment.minute - moment.minute % 15, second=0, microsecond=0)
    return window + timedelta(minutes=15) - timedelta(seconds=10)


def times_processed() -> dict[int, int]:
    """How many times each user was recorded by `record_user`."""
    return dict(db.session.execute(text("SELECT id, times_processed FROM users")).all())


# Planning "then" puts every slot in the past: its jobs run at once.
PAST = at("2026-01-05 08:59:50")
FIRST_SLOT = at("2026-01-05 09:00")


def assignment_rows(task_id):
    return db.session.execute(
        text(
            "SELECT user_id, status, attempts, error, slot_start FROM assignments "
            "WHERE task_id = :t ORDER BY position"
        ),
        {"t": task_id},
    ).all()


def parse_metrics(exposition: str) -> dict[tuple, float]:
    """Each sample of a /metrics answer by (name, sorted labels)."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def requests_counted(figures: dict, method: str, route: str, status: int) -> float:
    labels = (("method", method), ("route", route), ("status", str(status)))
    return figures.get(("slotted_http_requests_total", labels), 0.0)


def percentile(values: list[float], share: float) -> float:
    """The value `share` of the way through the sorted values (the nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def snapshot(app) -> dict[str, int]:
    """How many rows each table holds, and how many keys Redis: what a refused request
    must leave as it found it."""
    with app.app_context():
        limits.find(limits.DEFAULT)  # recorded once for all, as the first process would
        counts = {
            table: db.session.execute(text(f"SELECT count(*) FROM {table}")).scalar()
            for table in db.metadata.tables
        }
        counts["redis keys"] = get_redis().dbsize()
        return counts


def call_http_request(user_id: int, key: str, options: dict):
    """One call of the async `http_request` on a loop of its own, as a slot job's loop
    awaits it, its sessions closed with the loop."""
    from service.processors.builtin import http_request

    async def once():
        try:
            return await http_request(user_id, key, options)
        finally:
            await http_request.close(options)

    return asyncio.run(once())
