"""Running slots: claim a slot's IDs, process them paced through the slot, record each
outcome, retry failures in later slots; and reconcile Redis with PostgreSQL.

PostgreSQL is the guard against running an ID twice: a claim moves rows from `pending`
to `running` with FOR UPDATE SKIP LOCKED, so any number of workers (or duplicate jobs
for one slot) share a slot's IDs without overlap. Processing and recording an ID's
outcome commit together, so an ID whose worker dies before the commit is processed
again, once, after its claim times out.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import import_module

from flask import current_app
from rq.timeouts import JobTimeoutException
from sqlalchemy import text

from .extensions import db
from .models import AssignmentStatus, IdTask, TaskStatus
from .planning import replan_retries
from .queues import enqueue_planning
from .scheduling import ensure_slot_job, get_scheduler, planning_is_queued, schedule_slots
from .tasks import subtract_loads

log = logging.getLogger(__name__)

# IDs claimed at once when not pacing.
CLAIM_BATCH = 500
# With pacing on, a claim takes about this many seconds' worth of IDs.
CLAIM_AHEAD_SECONDS = 1.0
# IDs whose turns fall within this many seconds go to the processor together.
PACING_TICK_SECONDS = 0.05
# Pacing spreads a slot's IDs over this share of it, leaving the rest as a margin.
PACE_SHARE = 0.9
# A slot whose first claim comes later than this after its start is marked late.
LATE_AFTER_SECONDS = 1.0
# Reconcile gives jobs to the slots starting within this; each run moves it on.
RECONCILE_HORIZON = timedelta(hours=1)


@dataclass(frozen=True)
class Failure:
    """A processor's verdict on one ID; `retry` False means no further attempt."""

    message: str
    retry: bool = True


@dataclass(frozen=True)
class Claim:
    task_id: int
    position: int
    user_id: int
    attempts: int  # before this one
    claimed_at: datetime  # tells this claim from a later one of the same ID


def load_processor(path: str):
    module_name, _, function = path.partition(":")
    return getattr(import_module(module_name), function)


def run_slot(slot: datetime) -> str:
    """Process every pending ID of the slot: wait for its start, then claim, pace, record."""
    config = current_app.config
    processor = load_processor(config["ID_PROCESSOR"])
    _sleep_until(slot)
    handled = 0
    pace = _Pace(slot, config["SLOT_SECONDS"]) if config["PACING"] else None
    while True:
        claims, first_turn = claim(slot, pace.batch_size() if pace else CLAIM_BATCH)
        if not claims:
            break
        mark_tasks_running({c.task_id for c in claims})
        groups = pace.groups(claims, first_turn) if pace else [claims]
        for group in groups:
            record_outcomes(slot, group, process(processor, group))
            handled += len(group)
    return f"slot {slot:%Y-%m-%d %H:%M:%S}: {handled} IDs processed"


def claim(slot: datetime, limit: int) -> tuple[list[Claim], int]:
    """Take up to `limit` pending IDs of the slot; return them and the first one's turn."""
    rows = db.session.execute(
        text(
            "WITH picked AS ("
            "  SELECT task_id, position FROM assignments"
            "  WHERE slot_start = :slot AND status = 'pending'"
            "  LIMIT :limit FOR UPDATE SKIP LOCKED) "
            "UPDATE assignments AS a SET status = 'running', claimed_at = clock_timestamp() "
            "FROM picked WHERE a.task_id = picked.task_id AND a.position = picked.position "
            "RETURNING a.task_id, a.position, a.user_id, a.attempts, a.claimed_at"
        ),
        {"slot": slot, "limit": limit},
    ).all()
    if not rows:
        db.session.commit()
        return [], 0
    first_turn = db.session.execute(
        text(
            "UPDATE slots SET claimed = claimed + :n, "
            "  started_at = coalesce(started_at, clock_timestamp()), "
            "  last_claim_at = clock_timestamp(), "
            "  late = late OR (started_at IS NULL AND clock_timestamp() > slot_start + :late) "
            "WHERE slot_start = :slot RETURNING claimed - :n"
        ),
        {"n": len(rows), "slot": slot, "late": timedelta(seconds=LATE_AFTER_SECONDS)},
    ).scalar()
    db.session.commit()
    return [Claim(*row) for row in rows], first_turn or 0


def mark_tasks_running(task_ids: set[int]) -> None:
    """scheduled -> running, in a commit apart from the claim: a claim never waits for a
    task's row lock, which a replan or cancel holds while it waits for claimed rows."""
    db.session.execute(
        text(
            "UPDATE id_tasks SET status = 'running' WHERE id = ANY(:ids) AND status = 'scheduled'"
        ),
        {"ids": sorted(task_ids)},
    )
    db.session.commit()


def process(processor, group: list[Claim]) -> dict[int, Failure]:
    """Call the processor inside a savepoint: what it writes commits with the outcomes."""
    user_ids = [c.user_id for c in group]
    try:
        with db.session.begin_nested():
            verdicts = processor(user_ids) or {}
    except JobTimeoutException:
        raise  # the job's own time is up: not the processor's failure
    except Exception as exc:  # a processor's bug fails its IDs, not the slot
        log.exception("processor failed on %d IDs", len(user_ids))
        return {user_id: Failure(f"{type(exc).__name__}: {exc}") for user_id in user_ids}
    return {
        user_id: verdict if isinstance(verdict, Failure) else Failure(str(verdict))
        for user_id, verdict in verdicts.items()
    }


def record_outcomes(slot: datetime, group: list[Claim], failures: Mapping[int, Failure]) -> None:
    """Done, failed for good, or planned again in a later slot; counters follow.

    Only rows still held by this claim are written: if the claim timed out and the IDs
    went to another worker meanwhile, that worker's outcome is the one that counts.
    """
    task_ids = sorted({item.task_id for item in group})
    # Task rows first, in id order, as every writer of several tasks takes them.
    statuses = dict(
        db.session.execute(
            text("SELECT id, status FROM id_tasks WHERE id = ANY(:ids) ORDER BY id FOR UPDATE"),
            {"ids": task_ids},
        ).all()
    )
    max_attempts = current_app.config["MAX_ATTEMPTS"]
    verdicts = [
        _verdict(item, failures.get(item.user_id), statuses.get(item.task_id), max_attempts)
        for item in group
    ]
    written = _write_outcomes(group, verdicts)
    succeeded = [row for row in written if row.status == AssignmentStatus.DONE]
    db.session.execute(
        text("UPDATE slots SET done = done + :d, failed = failed + :f WHERE slot_start = :s"),
        {"d": len(succeeded), "f": len(written) - len(succeeded), "s": slot},
    )
    _count_on_tasks(written)
    new_slots = _plan_retries(
        [row for row in written if row.status == AssignmentStatus.PENDING], group
    )
    db.session.commit()
    schedule_slots(new_slots)


def _verdict(item: Claim, failure: Failure | None, task_status: str | None, max_attempts: int):
    """(new status, error) of one claimed ID."""
    if failure is None:
        return AssignmentStatus.DONE, None
    if not failure.retry or item.attempts + 1 >= max_attempts:
        return AssignmentStatus.FAILED, failure.message
    if task_status == TaskStatus.CANCELLED:
        return AssignmentStatus.CANCELLED, failure.message  # no retry for a cancelled task
    return AssignmentStatus.PENDING, failure.message


def _write_outcomes(group: list[Claim], verdicts: list[tuple[str, str | None]]) -> list:
    """One statement for the whole group; returns the rows that were still ours."""
    return db.session.execute(
        text(
            "UPDATE assignments AS a SET status = k.status, attempts = a.attempts + 1, "
            "  error = k.error, claimed_at = NULL, "
            "  finished_at = CASE WHEN k.status = 'pending' THEN NULL "
            "                ELSE clock_timestamp() END "
            "FROM unnest(CAST(:tasks AS bigint[]), CAST(:positions AS int[]), "
            "            CAST(:claimed AS timestamptz[]), CAST(:statuses AS text[]), "
            "            CAST(:errors AS text[])) "
            "  AS k(task_id, position, claimed_at, status, error) "
            "WHERE a.task_id = k.task_id AND a.position = k.position "
            "  AND a.status = 'running' AND a.claimed_at = k.claimed_at "
            "RETURNING a.task_id, a.position, a.user_id, a.attempts, a.status"
        ),
        {
            "tasks": [item.task_id for item in group],
            "positions": [item.position for item in group],
            "claimed": [item.claimed_at for item in group],
            "statuses": [status for status, _ in verdicts],
            "errors": [error for _, error in verdicts],
        },
    ).all()


def _count_on_tasks(written: list) -> None:
    """Add the outcomes to their tasks; one whose IDs have all finished becomes done, or
    failed if any failed."""
    counts: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for row in written:
        if row.status == AssignmentStatus.DONE:
            counts[row.task_id][0] += 1
        elif row.status == AssignmentStatus.FAILED:
            counts[row.task_id][1] += 1
    for task_id in sorted(counts):
        n_done, n_failed = counts[task_id]
        db.session.execute(
            text(
                "UPDATE id_tasks SET done = done + :d, failed = failed + :f, "
                "  status = CASE WHEN status = 'cancelled' THEN status "
                "    WHEN done + :d + failed + :f < total THEN 'running' "
                "    WHEN failed + :f > 0 THEN 'failed' ELSE 'done' END "
                "WHERE id = :t"
            ),
            {"d": n_done, "f": n_failed, "t": task_id},
        )


def _plan_retries(retried: list, group: list[Claim]) -> set[datetime]:
    """A retry is a request too: it is planned like any ID, after a backoff.

    One moment for the whole group, exponential in the most attempts among it, so that
    every task's retries take the window locks in the same, rising order.
    """
    if not retried:
        return set()
    base = current_app.config["RETRY_BACKOFF_SECONDS"]
    not_before = datetime.now(UTC) + timedelta(
        seconds=base * 2 ** (max(row.attempts for row in retried) - 1)
    )
    by_task: dict[int, list] = defaultdict(list)
    for row in retried:
        by_task[row.task_id].append((row.position, row.user_id))
    new_slots: set[datetime] = set()
    for task_id in sorted(by_task):
        task = db.session.get(IdTask, task_id)
        used = replan_retries(task_id, task.overflow, by_task[task_id], not_before)
        task.last_slot = max([task.last_slot, *used]) if task.last_slot else max(used)
        new_slots |= used
    return new_slots


class _Pace:
    """Spreads a slot's IDs evenly over it: the k-th claimed ID is due at its k-th turn."""

    def __init__(self, slot: datetime, slot_seconds: int):
        self.slot = slot
        self.span = slot_seconds * PACE_SHARE
        load = db.session.execute(
            text("SELECT load FROM slots WHERE slot_start = :s"), {"s": slot}
        ).scalar()
        self.load = max(1, load or 0)
        self.step = self.span / self.load

    def batch_size(self) -> int:
        return max(1, min(CLAIM_BATCH, math.ceil(CLAIM_AHEAD_SECONDS / self.step)))

    def groups(self, claims: list[Claim], first_turn: int) -> Iterator[list[Claim]]:
        """Yield the claims in groups, each when its first member's turn has come."""
        start = self.slot.timestamp()
        group: list[Claim] = []
        for turn, item in enumerate(claims, start=first_turn):
            wait = start + turn * self.step - time.time()
            if wait > PACING_TICK_SECONDS and group:
                yield group
                group = []
                wait = start + turn * self.step - time.time()
            if wait > 0:
                time.sleep(wait)
            group.append(item)
        if group:
            yield group


def _sleep_until(moment: datetime) -> None:
    wait = moment.timestamp() - time.time()
    if wait > 0:
        time.sleep(wait)


def reconcile() -> dict[str, int]:
    """Rebuild the schedule from PostgreSQL; Redis may have lost any part of it.

    - IDs claimed longer ago than CLAIM_TIMEOUT_SECONDS (their worker died) go back to
      pending, or to cancelled if their task was cancelled meanwhile;
    - every slot with pending IDs that starts within RECONCILE_HORIZON gets its job if it
      has none; one whose time has passed runs at once and is marked late (later slots
      are left to later runs: a job only has to exist before its slot starts);
    - tasks still received or planning get their planning job back if it is gone.
    """
    timeout = timedelta(seconds=current_app.config["CLAIM_TIMEOUT_SECONDS"])
    released = _release_stale_claims(timeout)
    now = datetime.now(UTC)
    scheduler = get_scheduler()
    added = [
        slot
        for slot, active in _slots_with_pending_ids(timeout, now + RECONCILE_HORIZON)
        if ensure_slot_job(scheduler, slot, now, trust_started=active)
    ]
    late = [slot for slot in added if slot <= now]
    if late:
        db.session.execute(
            text("UPDATE slots SET late = true WHERE slot_start = ANY(:late)"), {"late": late}
        )
        db.session.commit()
    waiting = db.session.execute(
        text("SELECT id, total FROM id_tasks WHERE status IN ('received', 'planning') ORDER BY id")
    ).all()
    requeued = [task for task in waiting if not planning_is_queued(task.id)]
    for task in requeued:
        enqueue_planning(task.id, task.total)
    return {
        "claims released": released,
        "slot jobs added": len(added),
        "late slots": len(late),
        "planning jobs added": len(requeued),
    }


def _release_stale_claims(timeout: timedelta) -> int:
    rows = db.session.execute(
        text(
            "WITH released AS ("
            "  UPDATE assignments AS a SET claimed_at = NULL, status = CASE "
            "    WHEN t.status = 'cancelled' THEN 'cancelled' ELSE 'pending' END "
            "  FROM id_tasks AS t WHERE t.id = a.task_id "
            "    AND a.status = 'running' AND a.claimed_at < clock_timestamp() - :timeout "
            "  RETURNING a.slot_start, a.status) "
            "SELECT slot_start, status, count(*) AS n FROM released GROUP BY slot_start, status"
        ),
        {"timeout": timeout},
    ).all()
    subtract_loads({row.slot_start: row.n for row in rows if row.status == "cancelled"})
    db.session.commit()
    return sum(row.n for row in rows)


def _slots_with_pending_ids(timeout: timedelta, until: datetime) -> list[tuple[datetime, bool]]:
    """Each slot up to `until` holding pending IDs, and whether its job claimed within
    the timeout.

    The slots are found from the pending rows themselves, one index probe per slot
    (a loose index scan), so no counter can hide one. A slot job claims IDs every
    second or so while it runs: one that Redis calls started but that has claimed
    nothing for CLAIM_TIMEOUT_SECONDS died with its worker.
    """
    return [
        (row.slot_start, row.active)
        for row in db.session.execute(
            text(
                "WITH RECURSIVE pending(slot_start) AS ("
                "  (SELECT slot_start FROM assignments WHERE status = 'pending' "
                "   ORDER BY slot_start LIMIT 1) "
                "  UNION ALL "
                "  SELECT (SELECT a.slot_start FROM assignments AS a "
                "          WHERE a.status = 'pending' AND a.slot_start > pending.slot_start "
                "          ORDER BY a.slot_start LIMIT 1) "
                "  FROM pending WHERE pending.slot_start <= :until) "
                "SELECT p.slot_start, clock_timestamp() "
                "  - coalesce(s.last_claim_at, p.slot_start) < :timeout AS active "
                "FROM pending AS p LEFT JOIN slots AS s ON s.slot_start = p.slot_start "
                "WHERE p.slot_start <= :until ORDER BY p.slot_start"
            ),
            {"timeout": timeout, "until": until},
        )
    ]
