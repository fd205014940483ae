"""Claims: a slot job takes a batch of the slot's pending IDs, in plan order, and
reserves their turns; before processing, it locks the rows its claim still holds.

PostgreSQL is the guard against running an ID twice: a claim moves rows from `pending`
to `running` with FOR UPDATE SKIP LOCKED, so any number of workers (or duplicate jobs
for one slot) share a slot's IDs without overlap. Each claim names its claimer (see
service/claimers.py), and `hold` keeps only the rows still under it: a claim taken over
meanwhile (its worker was stuck past the timeout) processes nothing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from flask import current_app

from service.core.extensions import db
from service.dispatch import store
from service.dispatch.pacing import CATCH_UP_SECONDS, step_of
from service.limits.settings import shared

# A slot whose first claim comes later than this after its start is marked late.
LATE_AFTER_SECONDS = 1.0


@dataclass(frozen=True)
class Claim:
    task_id: int
    position: int
    user_id: int
    attempts: int  # before this one
    claimed_at: datetime  # tells this claim from a later one of the same ID
    refusals: int = 0  # the downstream's refusals of it in a row, before this call
    task_day: date | None = None  # its task's day: the partition its row is in
    # time.monotonic() until which the claim surely holds (it was taken no earlier
    # than this process's moment before the claim, for `life`).
    holds_until: float = math.inf

    def key(self, deployment: str) -> str:
        """The ID's idempotency key: the same on every attempt (its task and place in
        it), and unique to the deployment."""
        return f"{deployment}-{self.task_id}-{self.position}"


def deployment_id() -> str:
    """This deployment's random id, made by the migrations (and again, should a
    database have lost its row)."""
    found = store.deployment_id()
    db.session.commit()
    return str(found)


@dataclass(frozen=True)
class Batch:
    """Claimed IDs in plan order; the first is due at `first_turn`, the rest `step` apart."""

    claims: list[Claim]
    first_turn: float
    step: float


def claim(
    limit_id: int,
    slot: datetime,
    claimer: int,
    size: int,
    now: datetime | None = None,
    slot_seconds: int | None = None,
    life: timedelta | None = None,
) -> Batch:
    """Take up to `size` pending IDs of a limit's slot, in plan order, and reserve their
    turns.

    Turns go on from the slot's last reserved one, or from `now` (less a short catch-up)
    if that is further behind: a late slot runs at its planned step from when it starts.
    `slot_seconds` is the deployment's, read here when the caller has not. The claim
    holds for `life` (by default CLAIM_TIMEOUT_SECONDS) even if this worker looks stuck.
    """
    life = life or timedelta(seconds=current_app.config["CLAIM_TIMEOUT_SECONDS"])
    asked_at = time.monotonic()
    rows = store.claim_pending(limit_id, slot, claimer, size, life)
    if not rows:
        db.session.commit()
        return Batch([], 0.0, 0.0)
    slot_seconds = slot_seconds or shared()["SLOT_SECONDS"]
    turns = store.reserve_turns(
        limit_id,
        slot,
        len(rows),
        late=timedelta(seconds=LATE_AFTER_SECONDS),
        now=now or datetime.now(UTC),
        catch_up=timedelta(seconds=CATCH_UP_SECONDS),
        pace=step_of(slot_seconds, 1),
    )
    db.session.commit()
    step = step_of(slot_seconds, turns.load)
    holds_until = asked_at + life.total_seconds()
    claims = [Claim(*row, holds_until=holds_until) for row in sorted(rows)]
    return Batch(claims, turns.next_turn_at.timestamp() - len(claims) * step, step)


def mark_tasks_running(task_ids: set[int]) -> None:
    """scheduled -> running, in a commit apart from the claim: a claim never waits for a
    task's row lock, which a replan or cancel holds while it waits for claimed rows."""
    store.mark_tasks_running(task_ids)
    db.session.commit()


def hold(group: list[Claim], claimer: int) -> list[Claim]:
    """Lock the group's rows that are still this claim's, until the transaction ends.

    A claim that timed out and went to another worker is no longer ours: reconcile's
    release waits on these locks, and finds the rows finished once they are released.
    """
    return still_claimed(db.session, group, claimer, lock=True)


def still_claimed(executor, group: list[Claim], claimer: int, lock: bool = False) -> list[Claim]:
    """The members of the group whose rows are still under this claim (the same claimer,
    the same claim of the ID), read through `executor`, a session or a connection; with
    `lock`, their rows locked in one order until its transaction ends."""
    ours = store.still_claimed(executor, claim_keys(group), claimer, lock)
    return [item for item in group if (item.task_id, item.position) in ours]


def claim_keys(group: list[Claim]) -> dict[str, list]:
    """The group's rows and claims, as the arrays of `store.CLAIM_KEYS`."""
    return {
        "tasks": [item.task_id for item in group],
        "positions": [item.position for item in group],
        "days": [item.task_day for item in group],
        "day_set": sorted({item.task_day for item in group}),
        "claimed": [item.claimed_at for item in group],
    }
