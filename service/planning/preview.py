"""Plan previews: where a task's IDs would land if it were submitted now.

The same planner, rules, loads and horizon as real planning, with nothing stored and no
lock that a submitter or a planner would wait for: the IDs are de-duplicated in a
temporary table as a task's are in its own chunks, the loads are read without locking,
the settings are read without share-locking them, and the transaction is rolled back at
the end. Only per-slot counters stay in memory, however many IDs come.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime

from service.core.extensions import db
from service.core.models import Limit, Overflow
from service.limits import store as limits
from service.limits.settings import shared
from service.planning import horizon
from service.planning.store import database_now
from service.planning.windows import WindowPlanner
from service.tasks.store import STAGED_TASK, read_ids, stage_ids

PREVIEW_CHUNKS = "preview_id_chunks"


class PreviewPlanner(WindowPlanner):
    """Plans by the rules of WindowPlanner, noting the loads instead of writing them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loads_before: dict[datetime, int] = {}
        self.added: dict[datetime, int] = {}

    def _settings(self) -> dict[str, int]:
        return shared()

    def _limit(self, limit_id: int) -> Limit:
        return limits.by_id(limit_id)

    def _lock(self, span: list[datetime]) -> None:
        """Nothing is written, so no other planner needs to wait for this one."""

    def _loads(self, slots: list[datetime]) -> list[int]:
        loads = super()._loads(slots)
        self.loads_before.update(zip(slots, loads))
        return loads

    def _store_loads(self, used: list[tuple[datetime, int]]) -> None:
        self.added.update(used)

    def slots(self) -> list[dict]:
        return [
            {
                "start": slot,
                "added": added,
                "load": self.loads_before[slot] + added,
                "capacity": self.rpm,
            }
            for slot, added in sorted(self.added.items())
        ]


def preview_plan(
    ids: Iterable[int],
    overflow: str | None = None,
    not_before: datetime | None = None,
    now: datetime | None = None,
    limit: str | None = None,
) -> dict:
    """Where the IDs would go if a task of them were planned into `limit` (default: the
    default limit) at `now` (default: the database's clock); stores nothing."""
    overflow = overflow or Overflow.SPREAD
    try:
        # Read before the rollback, which may take a default limit just recorded with it.
        chosen = limits.named_by_request(limit)
        limit_id, limit_name = _id_and_name(chosen)
        # The distinct IDs in a temporary table, gone with the transaction.
        staged = stage_ids(ids, PREVIEW_CHUNKS)
        submitted, distinct = staged.submitted, staged.distinct
        now = now or database_now()
        # Before planning: a plan past the horizon may be years of slots long.
        horizon.check(chosen, overflow, not_before, distinct, now)
        planner = PreviewPlanner(
            limit_id,
            overflow,
            now,
            expected_ids=distinct,
            not_before=not_before,
            horizon_days=horizon.horizon_days(),
        )
        planner.plan(read_ids(db.session.connection(), PREVIEW_CHUNKS, STAGED_TASK), _count)
    finally:
        db.session.rollback()
    slots = planner.slots()
    return {
        "now": now,
        "limit": limit_name,
        "rpm": planner.limit.rpm,
        "capacity": planner.rpm,
        "overflow": overflow,
        "not_before": not_before,
        "total": distinct,
        "duplicates": submitted - distinct,
        "first_slot": slots[0]["start"],
        "last_slot": slots[-1]["start"],
        "slots_above_rpm": sum(1 for slot in slots if slot["load"] > planner.rpm),
        "slots": slots,
    }


def _id_and_name(limit: Limit) -> tuple[int, str]:
    return limit.id, limit.name


def _count(pairs: Iterator, slots: list[datetime]) -> list[int]:
    counts = [0] * len(slots)
    for _, index in pairs:
        counts[index] += 1
    return counts
