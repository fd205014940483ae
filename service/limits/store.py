"""Limits: named downstreams, each with its own RPM, processor and processor options,
and its own slots, windows, planning locks and slot jobs; two never share capacity.

Tasks that name no limit go to `default`. As with the shared settings, the first
process that needs it records it from its own settings (RPM, ID_PROCESSOR and the
PROCESSOR_HTTP_* of the HTTP processor); the migration that brought limits did the same
from the values recorded then. From then on the row is the one source of truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from flask import current_app
from sqlalchemy import func, select, text
from sqlalchemy.dialects.postgresql import insert

from service.core.config import HTTP_PROCESSOR, RECORD_USER
from service.core.errors import Refused, not_found
from service.core.extensions import db
from service.core.models import (
    DEFAULT_MAX_REFUSALS,
    FINISHED,
    AssignmentStatus,
    IdTask,
    Limit,
    LimitEvent,
)
from service.limits import learning

DEFAULT = "default"
# What a limit created without a processor runs: the built-in one that records users.
DEFAULT_PROCESSOR = RECORD_USER
# Row locks a reader may take on a limit: planners share-lock it, so that a change of
# its RPM waits for them; a new task key-share-locks it, so that deleting it waits for
# the task, which a change does not.
SHARE, KEY_SHARE, CHANGE, REMOVE = "share", "key share", "change", "remove"
_LOCKS = {
    SHARE: {"read": True},
    KEY_SHARE: {"read": True, "key_share": True},
    CHANGE: {"key_share": True},
    REMOVE: {},
}


@dataclass(frozen=True)
class SlotOfLimit:
    """A slot of one limit as a slot job runs it: plain values, read once, that stay
    valid across the job's many transactions and threads."""

    limit_id: int
    limit_name: str
    start: datetime
    processor: str = DEFAULT_PROCESSOR
    options: dict = field(default_factory=dict)
    # The deployment's id, the first part of every idempotency key sent downstream.
    deployment: str = ""
    max_refusals: int = DEFAULT_MAX_REFUSALS

    @classmethod
    def of(cls, limit: Limit, start: datetime, deployment: str = "") -> SlotOfLimit:
        return cls(
            limit.id,
            limit.name,
            start,
            limit.processor,
            limit.options,
            deployment,
            limit.max_refusals,
        )


def find(name: str, lock: str | None = None) -> Limit | None:
    """The limit called `name`, or None; `default` is recorded from this app's settings
    the first time it is needed."""
    limit = _select(Limit.name == name, lock)
    if limit is None and name == DEFAULT:
        _record_default()
        limit = _select(Limit.name == name, lock)
    return limit


def by_id(limit_id: int, lock: str | None = None) -> Limit:
    limit = _select(Limit.id == limit_id, lock)
    if limit is None:
        raise not_found("limit", limit_id)
    return limit


def get_limit(name: str, lock: str | None = None) -> Limit:
    """For the routes that name a limit in their path: 404 when there is none."""
    limit = find(name, lock)
    if limit is None:
        raise not_found("limit", repr(name))
    return limit


def named_by_request(name: str | None, lock: str | None = None) -> Limit:
    """The limit a task or a query names (`default` when none): 422 when there is none."""
    name = name or DEFAULT
    limit = find(name, lock)
    if limit is None:
        raise Refused(f"no limit is named {name!r}", {"limit": ["no such limit; see GET /limits/"]})
    return limit


def _select(where, lock: str | None) -> Limit | None:
    query = select(Limit).where(where).execution_options(populate_existing=True)
    if lock:
        query = query.with_for_update(**_LOCKS[lock])
    return db.session.scalar(query)


def _record_default() -> None:
    """In a transaction of its own: recorded once for every process, whatever becomes
    of the caller's transaction."""
    config = current_app.config
    with db.engine.begin() as connection:
        connection.execute(
            insert(Limit)
            .values(
                name=DEFAULT,
                rpm=config["RPM"],
                processor=config["ID_PROCESSOR"],
                options=options_from_settings(config),
            )
            .on_conflict_do_nothing(index_elements=["name"])
        )


def options_from_settings(config) -> dict:
    """The HTTP processor's options as the PROCESSOR_HTTP_* settings give them."""
    if config["ID_PROCESSOR"] != HTTP_PROCESSOR:
        return {}
    options = {
        "url": config["PROCESSOR_HTTP_URL"],
        "method": config["PROCESSOR_HTTP_METHOD"],
        "timeout": config["PROCESSOR_HTTP_TIMEOUT"],
    }
    return {name: value for name, value in options.items() if value is not None}


def counts(limit_ids: list[int]) -> dict[int, dict[str, int]]:
    """Pending, done and failed IDs of each limit, from its tasks' counters."""
    unfinished = IdTask.status.not_in(FINISHED)
    rows = db.session.execute(
        select(
            IdTask.limit_id,
            func.coalesce(
                func.sum(IdTask.total - IdTask.done - IdTask.failed).filter(unfinished), 0
            ),
            func.coalesce(func.sum(IdTask.done), 0),
            func.coalesce(func.sum(IdTask.failed), 0),
        )
        .where(IdTask.limit_id.in_(limit_ids))
        .group_by(IdTask.limit_id)
    )
    return {
        limit_id: {"pending": pending, "done": done, "failed": failed}
        for limit_id, pending, done, failed in rows
    }


def set_default_rpm(rpm: int) -> None:
    """RPM as a shared setting is the default limit's (service/shared_settings.py)."""
    find(DEFAULT, CHANGE).rpm = rpm


def active_limits() -> list[Limit]:
    """The limits whose slots run: every one not paused."""
    return db.session.scalars(select(Limit).where(Limit.paused.is_(False)).order_by(Limit.id)).all()


def mark_held(limit_id: int) -> None:
    """Record that a limit was found held (service/limits/held.py), once: the mark keeps
    the moment it was first found so. The caller commits."""
    db.session.execute(
        text("UPDATE limits SET held_since = now() WHERE id = :id AND held_since IS NULL"),
        {"id": limit_id},
    )


def slot_capacity(limit: Limit) -> int:
    """What a slot of the limit takes: its learned rate (service/limits/learning.py),
    never above its rpm."""
    learned = db.session.scalar(
        text("SELECT learned_rpm FROM learned_rates WHERE limit_id = :limit"), {"limit": limit.id}
    )
    return learning.capacity(limit.rpm, learned)


def events_page(limit_id: int, offset: int, size: int) -> tuple[list[LimitEvent], int]:
    """A page of the limit's events, newest first, and how many it has."""
    mine = LimitEvent.limit_id == limit_id
    count = db.session.scalar(select(func.count()).select_from(LimitEvent).where(mine))
    page = db.session.scalars(
        select(LimitEvent).where(mine).order_by(LimitEvent.id.desc()).offset(offset).limit(size)
    ).all()
    return list(page), count


def unfinished_replans() -> list[tuple[int, int]]:
    """(limit_id, event_id) of each limit's newest re-plan that has not ended."""
    rows = db.session.execute(
        text(
            "SELECT r.limit_id, r.replan_event_id FROM learned_rates AS r "
            "JOIN limit_events AS e ON e.id = r.replan_event_id WHERE e.finished_at IS NULL"
        )
    )
    return [tuple(row) for row in rows]


def name_of(limit_id: int) -> str | None:
    return db.session.scalar(select(Limit.name).where(Limit.id == limit_id))


def all_names() -> list[str]:
    return list(db.session.scalars(select(Limit.name).order_by(Limit.name)))


def slots_with_pending_ids(limit_id: int, slots: list[datetime]) -> set[datetime]:
    """Those of a limit's slots that hold pending IDs."""
    return set(
        db.session.scalars(
            text(
                "SELECT DISTINCT slot_start FROM assignments "
                "WHERE limit_id = :limit AND slot_start = ANY(:slots) AND status = :pending"
            ),
            {"limit": limit_id, "slots": slots, "pending": AssignmentStatus.PENDING},
        )
    )


def subtract_loads(released: dict[tuple[int, datetime], int]) -> None:
    """Lower the loads of slots, keyed by limit and start, locking their rows in time
    order as planners add to them, so that the two never wait on each other in a circle."""
    if not released:
        return
    keys = sorted(released)
    limit_ids, slots = [limit_id for limit_id, _ in keys], [slot for _, slot in keys]
    params = {"limits": limit_ids, "slots": slots}
    db.session.execute(
        text(
            "SELECT 1 FROM slots JOIN unnest(CAST(:limits AS int[]), "
            "  CAST(:slots AS timestamptz[])) AS r(limit_id, slot) "
            "  ON slots.limit_id = r.limit_id AND slots.slot_start = r.slot "
            "ORDER BY slots.limit_id, slots.slot_start FOR UPDATE OF slots"
        ),
        params,
    )
    db.session.execute(
        text(
            "UPDATE slots SET load = slots.load - r.n "
            "FROM unnest(CAST(:limits AS int[]), CAST(:slots AS timestamptz[]), "
            "  CAST(:counts AS int[])) AS r(limit_id, slot, n) "
            "WHERE slots.limit_id = r.limit_id AND slots.slot_start = r.slot"
        ),
        {**params, "counts": [released[key] for key in keys]},
    )


# Learned rates (service/limits/learning.py). A refusal is counted on the limit's row of
# `learned_rates`, made by the first one; that row is locked until the outcomes commit.
RECORD_REFUSALS = text(
    "INSERT INTO learned_rates AS r (limit_id, refusals, last_refusal_at, "
    "  last_refusal_status, last_refusal_retry_after, last_refusal_reason) "
    "VALUES (:limit, :n, clock_timestamp(), :status, :retry_after, :reason) "
    "ON CONFLICT (limit_id) DO UPDATE SET refusals = r.refusals + EXCLUDED.refusals, "
    "  last_refusal_at = EXCLUDED.last_refusal_at, "
    "  last_refusal_status = EXCLUDED.last_refusal_status, "
    "  last_refusal_retry_after = EXCLUDED.last_refusal_retry_after, "
    "  last_refusal_reason = EXCLUDED.last_refusal_reason"
)
LEARNED = text(
    "SELECT l.rpm, l.adaptive, r.learned_rpm, r.learned_slot, r.learned_at, "
    "  r.last_refusal_at, clock_timestamp() AS now "
    "FROM limits AS l LEFT JOIN learned_rates AS r ON r.limit_id = l.id WHERE l.id = :limit"
)
LOCK_LEARNED = text("SELECT 1 FROM learned_rates WHERE limit_id = :limit FOR UPDATE")
NEW_EVENT = text(
    "INSERT INTO limit_events (limit_id, kind, reason, from_rpm, to_rpm) "
    "VALUES (:limit, :kind, :reason, :from_rpm, :to_rpm) RETURNING id"
)
SET_LEARNED = text(
    "INSERT INTO learned_rates AS r (limit_id, learned_rpm, learned_slot, learned_at, "
    "  replan_event_id) "
    "VALUES (:limit, :learned, :slot, clock_timestamp(), :event) "
    "ON CONFLICT (limit_id) DO UPDATE SET learned_rpm = EXCLUDED.learned_rpm, "
    "  learned_slot = coalesce(EXCLUDED.learned_slot, r.learned_slot), "
    "  learned_at = EXCLUDED.learned_at, replan_event_id = EXCLUDED.replan_event_id"
)
LEARNED_RATES = text(
    "SELECT limit_id, learned_rpm, refusals, last_refusal_at, last_refusal_status, "
    "  last_refusal_retry_after, last_refusal_reason, replan_event_id "
    "FROM learned_rates WHERE limit_id = ANY(:limits)"
)


def record_refusals(limit_id: int, count: int, status, retry_after, reason: str) -> None:
    """Count refusals on the limit, keeping the last."""
    params = {"limit": limit_id, "n": count, "status": status, "retry_after": retry_after}
    db.session.execute(RECORD_REFUSALS, {**params, "reason": reason})


def learned(limit_id: int, lock: bool = False):
    """(rpm, adaptive, learned_rpm, learned_slot, learned_at, last_refusal_at, now) of a
    limit; with `lock`, its learned rate's row is locked until the transaction ends."""
    if lock:
        db.session.execute(LOCK_LEARNED, {"limit": limit_id})
    return db.session.execute(LEARNED, {"limit": limit_id}).one_or_none()


def new_event(limit_id: int, kind: str, reason: str, from_rpm: int, to_rpm: int) -> int:
    params = {"limit": limit_id, "kind": kind, "reason": reason}
    return db.session.scalar(NEW_EVENT, {**params, "from_rpm": from_rpm, "to_rpm": to_rpm})


def set_learned(limit_id: int, learned_rpm: int | None, slot: datetime | None, event: int):
    """The limit's learned rate (None: back at its rpm), changed by `event`; `slot` is
    the slot whose refusals lowered it."""
    params = {"limit": limit_id, "learned": learned_rpm, "slot": slot, "event": event}
    db.session.execute(SET_LEARNED, params)


def learned_rates(limit_ids: list[int]) -> dict[int, object]:
    """The learned-rate rows of the limits that have one, by limit id."""
    rows = db.session.execute(LEARNED_RATES, {"limits": limit_ids})
    return {row.limit_id: row for row in rows}
