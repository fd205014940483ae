"""Running slots: claim a slot's IDs, process each at its turn, record each outcome;
and reconcile Redis with PostgreSQL.

PostgreSQL is the guard against running an ID twice: a claim moves rows from `pending`
to `running` with FOR UPDATE SKIP LOCKED, so any number of workers (or duplicate jobs
for one slot) share a slot's IDs without overlap. Each claim names its claimer (see
service/claimers.py). Processing a group of IDs and recording their outcomes is one
transaction that first locks the rows the claim still holds and hands only those to the
processor: a claim taken over meanwhile (its worker was stuck) processes nothing.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from flask import current_app
from rq.timeouts import JobTimeoutException
from sqlalchemy import text

from . import claimers
from .extensions import db
from .models import AssignmentStatus, TaskStatus
from .pacing import CATCH_UP_SECONDS, SYSTEM_CLOCK, Clock, paced_groups, step_of
from .processors import Failure, as_failure, is_per_id, load_processor, takes_keys
from .queues import enqueue_planning
from .retries import backoff, enqueue_retry_planning, retries_waiting
from .scheduling import add_slot_helper, ensure_slot_job, get_scheduler, planning_is_queued
from .shared_settings import shared

log = logging.getLogger(__name__)

# IDs claimed at once when not pacing.
CLAIM_BATCH = 500
# With pacing on, a claim takes about this many seconds' worth of IDs.
CLAIM_AHEAD_SECONDS = 1.0
# A per-ID processor's outcomes are recorded this often.
RECORD_EVERY_SECONDS = 0.25
# A slot job this far behind its turns asks for a helper, at most once per HELP_EVERY.
HELP_WHEN_BEHIND_SECONDS = 0.5
HELP_EVERY_SECONDS = 2.0
# A slot whose first claim comes later than this after its start is marked late.
LATE_AFTER_SECONDS = 1.0
# Reconcile gives jobs to the slots starting within this; each run moves it on.
RECONCILE_HORIZON = timedelta(hours=1)


@dataclass(frozen=True)
class Claim:
    task_id: int
    position: int
    user_id: int
    attempts: int  # before this one
    claimed_at: datetime  # tells this claim from a later one of the same ID

    @property
    def idempotency_key(self) -> str:
        """The same on every attempt: the ID's task and place in it."""
        return f"{self.task_id}-{self.position}"


@dataclass(frozen=True)
class Batch:
    """Claimed IDs in plan order; the first is due at `first_turn`, the rest `step` apart."""

    claims: list[Claim]
    first_turn: float
    step: float


def run_slot(slot: datetime, clock: Clock = SYSTEM_CLOCK) -> str:
    """Process every pending ID of the slot: wait for its start, then claim, pace, record.

    A slot job that runs behind its turns (its processor is slower than the slot's rate)
    adds helper jobs for the same slot, which share its IDs through the same claims and
    turns. Stops early, handing back what it has claimed but not processed, when its
    worker is asked to shut down.
    """
    processor = load_processor(current_app.config["ID_PROCESSOR"])
    with claimers.claiming(slot) as claimer:
        calls = _calls(slot, claimer, processor, clock)
        helping = _Helpers(slot, clock)
        clock.wait_until(slot.timestamp(), claimers.stop_requested)
        while not claimers.stop_requested():
            batch = claim(slot, claimer, _batch_size(slot), clock.now())
            if not batch.claims:
                break
            mark_tasks_running({c.task_id for c in batch.claims})
            for turn, group in _groups(batch, clock):
                calls.hand(group, turn)
                helping.note(calls.behind(turn))
        calls.finish()
        handed_back = claimers.release_held_by(claimer)
    stopped = f", {handed_back} handed back" if handed_back else ""
    return f"slot {slot:%Y-%m-%d %H:%M:%S}: {calls.handled} IDs processed{stopped}"


def _calls(slot: datetime, claimer: int, processor: Callable, clock: Clock):
    if is_per_id(processor):
        concurrency = current_app.config["PROCESSOR_CONCURRENCY"]
        return ConcurrentCalls(slot, claimer, processor, clock, concurrency)
    return GroupCalls(slot, claimer, processor, clock)


class GroupCalls:
    """A group processor gets each paced group at once, in the transaction that records
    the group's outcomes."""

    def __init__(self, slot: datetime, claimer: int, processor: Callable, clock: Clock):
        self.slot, self.claimer, self.processor, self.clock = slot, claimer, processor, clock
        self.handled = 0

    def hand(self, group: list[Claim], turn: float) -> None:
        self.handled += process_and_record(self.slot, self.claimer, group, self.processor)

    def behind(self, turn: float) -> float:
        """How late the calls start against their turns."""
        return self.clock.seconds() - turn

    def finish(self) -> None:
        pass


class ConcurrentCalls:
    """A per-ID processor gets each ID at its turn on a pool of threads, whatever the
    calls before it are still waiting for; outcomes are recorded in batches, each in a
    transaction that keeps only the IDs the claim still holds."""

    def __init__(
        self, slot: datetime, claimer: int, processor: Callable, clock: Clock, concurrency: int
    ):
        self.slot, self.claimer, self.processor, self.clock = slot, claimer, processor, clock
        self.app = current_app._get_current_object()
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="processor")
        self.in_flight: list[tuple[Claim, Future]] = []
        self.recorded_at = time.monotonic()
        self.start_lag = 0.0
        self.handled = 0

    def hand(self, group: list[Claim], turn: float) -> None:
        for item in group:
            self.in_flight.append((item, self.pool.submit(self._call, item, turn)))
        if time.monotonic() - self.recorded_at >= RECORD_EVERY_SECONDS:
            self._record(self._take_finished())

    def behind(self, turn: float) -> float:
        """How late the latest call started against its turn: with every thread busy,
        calls wait in the pool's queue."""
        return max(self.clock.seconds() - turn, self.start_lag)

    def finish(self) -> None:
        wait([future for _, future in self.in_flight])
        self._record(self._take_finished())
        self.pool.shutdown()

    def _call(self, item: Claim, turn: float) -> Failure | None:
        self.start_lag = self.clock.seconds() - turn
        with self.app.app_context():
            try:
                return as_failure(self.processor(item.user_id, item.idempotency_key))
            except Exception as exc:  # a processor's bug fails its ID, not the slot
                log.exception("processor failed on ID %s", item.user_id)
                return Failure(f"{type(exc).__name__}: {exc}")

    def _take_finished(self) -> list[tuple[Claim, Failure | None]]:
        finished = [(item, future) for item, future in self.in_flight if future.done()]
        self.in_flight = [pair for pair in self.in_flight if not pair[1].done()]
        return [(item, future.result()) for item, future in finished]

    def _record(self, outcomes: list[tuple[Claim, Failure | None]]) -> None:
        self.recorded_at = time.monotonic()
        if not outcomes:
            return
        held = hold([item for item, _ in outcomes], self.claimer)
        failures = {item.user_id: failure for item, failure in outcomes if failure}
        record_outcomes(self.slot, held, failures)
        self.handled += len(held)


class _Helpers:
    """Adds a helper job for the slot when its job runs behind its turns."""

    def __init__(self, slot: datetime, clock: Clock):
        self.slot, self.clock = slot, clock
        self.limit = current_app.config["MAX_HELPERS_PER_SLOT"]
        self.asked_at: float | None = None

    def note(self, behind: float) -> None:
        if self.limit == 0 or behind < HELP_WHEN_BEHIND_SECONDS:
            return
        now = self.clock.seconds()
        if self.asked_at is not None and now - self.asked_at < HELP_EVERY_SECONDS:
            return
        self.asked_at = now
        if add_slot_helper(self.slot, self.limit):
            log.info("slot %s runs %.1f s behind its turns: helper added", self.slot, behind)


def _batch_size(slot: datetime) -> int:
    if not current_app.config["PACING"]:
        return CLAIM_BATCH
    load = db.session.execute(
        text("SELECT load FROM slots WHERE slot_start = :s"), {"s": slot}
    ).scalar()
    step = step_of(shared()["SLOT_SECONDS"], load or 0)
    return max(1, min(CLAIM_BATCH, round(CLAIM_AHEAD_SECONDS / step)))


def _groups(batch: Batch, clock: Clock):
    if not current_app.config["PACING"]:
        return [(clock.seconds(), batch.claims)]
    return paced_groups(batch.claims, batch.first_turn, batch.step, clock, claimers.stop_requested)


def claim(slot: datetime, claimer: int, limit: int, now: datetime | None = None) -> Batch:
    """Take up to `limit` pending IDs of the slot, in plan order, and reserve their turns.

    Turns go on from the slot's last reserved one, or from `now` (less a short catch-up)
    if that is further behind: a late slot runs at its planned step from when it starts.
    """
    rows = db.session.execute(
        text(
            "WITH picked AS ("
            "  SELECT task_id, position FROM assignments"
            "  WHERE slot_start = :slot AND status = 'pending'"
            "  ORDER BY task_id, position LIMIT :limit FOR UPDATE SKIP LOCKED) "
            "UPDATE assignments AS a SET status = 'running', claimed_at = clock_timestamp(), "
            "  claimed_by = :claimer "
            "FROM picked WHERE a.task_id = picked.task_id AND a.position = picked.position "
            "RETURNING a.task_id, a.position, a.user_id, a.attempts, a.claimed_at"
        ),
        {"slot": slot, "limit": limit, "claimer": claimer},
    ).all()
    if not rows:
        db.session.commit()
        return Batch([], 0.0, 0.0)
    slot_seconds = shared()["SLOT_SECONDS"]
    turns = db.session.execute(
        text(
            "UPDATE slots SET "
            "  started_at = coalesce(started_at, clock_timestamp()), "
            "  last_claim_at = clock_timestamp(), "
            "  late = late OR (started_at IS NULL AND clock_timestamp() > slot_start + :late), "
            "  next_turn_at = greatest(coalesce(next_turn_at, slot_start), :now - :catch_up) "
            "    + make_interval(secs => :n * :span / greatest(load, 1)) "
            "WHERE slot_start = :slot RETURNING next_turn_at, load"
        ),
        {
            "n": len(rows),
            "slot": slot,
            "late": timedelta(seconds=LATE_AFTER_SECONDS),
            "now": now or datetime.now(UTC),
            "catch_up": timedelta(seconds=CATCH_UP_SECONDS),
            "span": step_of(slot_seconds, 1),
        },
    ).one()
    db.session.commit()
    step = step_of(slot_seconds, turns.load)
    claims = [Claim(*row) for row in sorted(rows)]
    return Batch(claims, turns.next_turn_at.timestamp() - len(claims) * step, step)


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


def process_and_record(slot: datetime, claimer: int, group: list[Claim], processor) -> int:
    """Process the IDs of the group that this claim still holds, and record their
    outcomes, in one transaction; returns how many it processed."""
    held = hold(group, claimer)
    if held:
        record_outcomes(slot, held, process(processor, held))
    else:
        db.session.commit()
    return len(held)


def hold(group: list[Claim], claimer: int) -> list[Claim]:
    """Lock the group's rows that are still this claim's, until the transaction ends.

    A claim that timed out and went to another worker is no longer ours: reconcile's
    release waits on these locks, and finds the rows finished once they are released.
    """
    held = db.session.execute(
        text(
            "SELECT a.task_id, a.position FROM assignments AS a "
            "JOIN unnest(CAST(:tasks AS bigint[]), CAST(:positions AS int[]), "
            "            CAST(:claimed AS timestamptz[])) AS k(task_id, position, claimed_at) "
            "  ON a.task_id = k.task_id AND a.position = k.position "
            "WHERE a.status = 'running' AND a.claimed_at = k.claimed_at "
            "  AND a.claimed_by = :claimer "
            "ORDER BY a.task_id, a.position FOR UPDATE OF a"
        ),
        {
            **_claim_keys(group),
            "claimer": claimer,
        },
    ).all()
    still_ours = {tuple(row) for row in held}
    return [item for item in group if (item.task_id, item.position) in still_ours]


def _claim_keys(group: list[Claim]) -> dict[str, list]:
    """The group's rows and claims, as arrays for `unnest(:tasks, :positions, :claimed)`."""
    return {
        "tasks": [item.task_id for item in group],
        "positions": [item.position for item in group],
        "claimed": [item.claimed_at for item in group],
    }


def process(processor, group: list[Claim]) -> dict[int, Failure]:
    """Call a group processor inside a savepoint: what it writes commits with the outcomes.

    A processor that takes `keys` gets each ID's idempotency key alongside it.
    """
    user_ids = [c.user_id for c in group]
    extra = {}
    if takes_keys(processor):
        extra["keys"] = [c.idempotency_key for c in group]
    try:
        with db.session.begin_nested():
            verdicts = processor(user_ids, **extra) or {}
    except JobTimeoutException:
        raise  # the job's own time is up: not the processor's failure
    except Exception as exc:  # a processor's bug fails its IDs, not the slot
        log.exception("processor failed on %d IDs", len(user_ids))
        return {user_id: Failure(f"{type(exc).__name__}: {exc}") for user_id in user_ids}
    return {user_id: as_failure(verdict) for user_id, verdict in verdicts.items()}


def record_outcomes(slot: datetime, group: list[Claim], failures: Mapping[int, Failure]) -> None:
    """Done, failed for good, or retrying (planned again by a job of its own); counters
    follow.

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
    max_attempts = shared()["MAX_ATTEMPTS"]
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
    db.session.commit()
    if any(row.status == AssignmentStatus.RETRYING for row in written):
        enqueue_retry_planning()


def _verdict(item: Claim, failure: Failure | None, task_status: str | None, max_attempts: int):
    """(new status, error, retry at) of one claimed ID."""
    if failure is None:
        return AssignmentStatus.DONE, None, None
    if not failure.retry or item.attempts + 1 >= max_attempts:
        return AssignmentStatus.FAILED, failure.message, None
    if task_status == TaskStatus.CANCELLED:
        return AssignmentStatus.CANCELLED, failure.message, None  # no retry for a cancelled task
    retry_at = datetime.now(UTC) + backoff(item.attempts + 1)
    return AssignmentStatus.RETRYING, failure.message, retry_at


def _write_outcomes(group: list[Claim], verdicts: list[tuple]) -> list:
    """One statement for the whole group; returns the rows that were still ours."""
    return db.session.execute(
        text(
            "UPDATE assignments AS a SET status = k.status, attempts = a.attempts + 1, "
            "  error = k.error, claimed_at = NULL, claimed_by = NULL, retry_at = k.retry_at, "
            "  finished_at = CASE WHEN k.status = 'retrying' THEN NULL "
            "                ELSE clock_timestamp() END "
            "FROM unnest(CAST(:tasks AS bigint[]), CAST(:positions AS int[]), "
            "            CAST(:claimed AS timestamptz[]), CAST(:statuses AS text[]), "
            "            CAST(:errors AS text[]), CAST(:retry_at AS timestamptz[])) "
            "  AS k(task_id, position, claimed_at, status, error, retry_at) "
            "WHERE a.task_id = k.task_id AND a.position = k.position "
            "  AND a.status = 'running' AND a.claimed_at = k.claimed_at "
            "RETURNING a.task_id, a.position, a.user_id, a.attempts, a.status"
        ),
        {
            **_claim_keys(group),
            "statuses": [status for status, _, _ in verdicts],
            "errors": [error for _, error, _ in verdicts],
            "retry_at": [retry_at for _, _, retry_at in verdicts],
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


def reconcile() -> dict[str, int]:
    """Rebuild the schedule from PostgreSQL; Redis may have lost any part of it.

    - IDs whose claimer is gone (its worker died) go back to pending at once, as do IDs
      claimed longer ago than CLAIM_TIMEOUT_SECONDS (its worker is stuck); to cancelled
      if their task was cancelled meanwhile;
    - every slot with pending IDs that starts within RECONCILE_HORIZON gets its job if it
      has none running; one whose time has passed runs at once and is marked late (later
      slots are left to later runs: a job only has to exist before its slot starts);
    - tasks still received or planning get their planning job back if it is gone, and
      retrying IDs a run of the retry planning.
    """
    timeout = timedelta(seconds=current_app.config["CLAIM_TIMEOUT_SECONDS"])
    released = claimers.release_dead_or_stuck(timeout)
    now = datetime.now(UTC)
    scheduler = get_scheduler()
    running = claimers.running_slots()

    def live(slot: datetime) -> bool:
        # A job that has not reached its slot yet may still be starting up.
        return slot > now or claimers.slot_key(slot) in running

    added = [
        slot
        for slot, claiming in _slots_with_pending_ids(timeout, now + RECONCILE_HORIZON)
        if ensure_slot_job(scheduler, slot, now, trust_started=claiming and live(slot))
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
    retries = retries_waiting() and enqueue_retry_planning()
    return {
        "claims released": released,
        "slot jobs added": len(added),
        "late slots": len(late),
        "planning jobs added": len(requeued),
        "retry planning queued": int(retries),
    }


def _slots_with_pending_ids(timeout: timedelta, until: datetime) -> list[tuple[datetime, bool]]:
    """Each slot up to `until` holding pending IDs, and whether its job claimed within
    the timeout.

    The slots are found from the pending rows themselves, one index probe per slot
    (a loose index scan), so no counter can hide one. A slot job claims IDs every
    second or so while it runs: one that has claimed nothing for CLAIM_TIMEOUT_SECONDS
    is stuck, even if its worker is alive.
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
