"""Outcomes: what becomes of each processed ID.

An ID becomes `done`, `failed` (after MAX_ATTEMPTS, or a failure marked final), or
`retrying`: a retry is a request too, so it is planned into a later slot like any ID,
after a backoff, by service/planning/retries.py. A refusal (`Refused`) is retried too,
after its Retry-After, without using an attempt; its limit's `max_refusals` in a row
fail the ID. Refusals teach the limit a lower rate (service/limits/rates.py), whose
re-plan is enqueued once the outcomes have committed.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from flask import current_app
from rq import get_current_job
from rq.timeouts import JobTimeoutException

from service.core.extensions import db
from service.core.models import AssignmentStatus, TaskStatus
from service.dispatch import store
from service.dispatch.claims import Claim, claim_keys, hold
from service.jobs import enqueue_replan, enqueue_retry_planning
from service.limits import rates
from service.limits.learning import refusal_wait
from service.limits.settings import shared
from service.limits.store import SlotOfLimit
from service.planning.replan import replan_limit
from service.processors.contract import Failure, Refused, as_failure, bounded, takes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tally:
    """Outcomes recorded: IDs done, and attempts that failed (to be retried or not)."""

    done: int = 0
    failed: int = 0
    refused: int = 0  # calls the downstream refused for now: no attempt used

    @property
    def processed(self) -> int:
        return self.done + self.failed + self.refused

    def __add__(self, other: Tally) -> Tally:
        return Tally(
            self.done + other.done, self.failed + other.failed, self.refused + other.refused
        )


def backoff(attempts: int) -> timedelta:
    """RETRY_BACKOFF_SECONDS, doubled for each attempt after the first."""
    base = current_app.config["RETRY_BACKOFF_SECONDS"]
    return timedelta(seconds=base * 2 ** (attempts - 1))


def process_and_record(
    slot: SlotOfLimit,
    claimer: int,
    group: list[Claim],
    processor,
    max_attempts: int | None = None,
) -> Tally:
    """Process the IDs of the group that this claim still holds, and record their
    outcomes, in one transaction."""
    held = hold(group, claimer)
    if not held:
        db.session.commit()
        return Tally()
    failures = process(processor, held, slot)
    return record_outcomes(slot, held, failures, max_attempts)


def process(processor, group: list[Claim], slot: SlotOfLimit) -> dict[int, Failure]:
    """Call a group processor inside a savepoint: what it writes commits with the outcomes.

    A processor that takes `keys` gets each ID's idempotency key alongside it; one that
    takes `options`, its limit's options.
    """
    user_ids = [c.user_id for c in group]
    extra = {}
    if takes(processor, "keys"):
        extra["keys"] = [c.key(slot.deployment) for c in group]
    if takes(processor, "options"):
        extra["options"] = slot.options
    try:
        with db.session.begin_nested():
            verdicts = processor(user_ids, **extra) or {}
    except JobTimeoutException:
        raise  # the job's own time is up: not the processor's failure
    except Exception as exc:  # a processor's bug fails its IDs, not the slot
        log.exception("processor failed on %d IDs", len(user_ids))
        return {user_id: Failure(f"{type(exc).__name__}: {exc}") for user_id in user_ids}
    if not isinstance(verdicts, Mapping):
        kind = type(verdicts).__name__
        log.error("processor answered a %s on %d IDs", kind, len(user_ids))
        failure = Failure(f"the processor answered a {kind}, not a mapping of the IDs that failed")
        return dict.fromkeys(user_ids, failure)
    return {user_id: as_failure(verdict) for user_id, verdict in verdicts.items()}


def record_outcomes(
    slot: SlotOfLimit,
    group: list[Claim],
    failures: Mapping[int, Failure],
    max_attempts: int | None = None,
    ended_at: Mapping[tuple[int, int], datetime] | None = None,
    seen_accepting: float | None = None,
) -> Tally:
    """Done, failed for good, or retrying (planned again by a job of its own); counters
    follow. `max_attempts` is the deployment's, read here when the caller has not.
    `ended_at` tells, by (task, position), when each call ended: the ID's `finished_at`
    (by default, the moment of recording, as for a group processor, whose calls end in
    the transaction that records them). `seen_accepting` is what the caller saw the
    downstream accept over the last slot's length, which a refusal's lowering of the
    rate may use.

    Only rows still held by this claim are written: if the claim timed out and the IDs
    went to another worker meanwhile, that worker's outcome is the one that counts.
    """
    statuses = store.lock_task_statuses(sorted({item.task_id for item in group}))
    refusing = any(isinstance(failure, Refused) for failure in failures.values())
    settings = shared() if refusing or not max_attempts else {}
    rules = _Rules(
        max_attempts or settings["MAX_ATTEMPTS"],
        slot.max_refusals,
        settings["SLOT_SECONDS"] if refusing else 0,  # only a refusal's wait needs it
        datetime.now(UTC),
    )
    verdicts = [
        rules.verdict(item, failures.get(item.user_id), statuses.get(item.task_id))
        for item in group
    ]
    ended = [(ended_at or {}).get((item.task_id, item.position)) for item in group]
    written = store.write_outcomes(claim_keys(group), verdicts, ended)
    refused = _refusals_written(written, failures)
    succeeded = [row for row in written if row.status == AssignmentStatus.DONE]
    # A refusal that failed its ID for good (max_refusals) is a failure there.
    waiting = sum(1 for row, _ in refused if row.status == AssignmentStatus.RETRYING)
    failed = len(written) - len(succeeded) - waiting
    store.add_slot_outcomes(slot.limit_id, slot.start, len(succeeded), failed)
    _count_on_tasks(written)
    change = None
    if refused:
        verdicts = [refusal for _, refusal in refused]
        change = rates.note_refusals(slot, verdicts, rules.slot_seconds, seen_accepting)
    db.session.commit()
    if any(row.status == AssignmentStatus.RETRYING for row in written):
        enqueue_retry_planning()
    if change is not None:
        start_replan(slot.limit_id, change.event_id)
    return Tally(len(succeeded), failed, waiting)


def start_replan(limit_id: int, event_id: int) -> None:
    """Queue the re-plan of a change of the learned rate and, inside a worker's job,
    start it at once on a thread of this job's process too: the limit's other slot
    jobs, which wait for their turns, may hold every worker for a while. The two share
    the work (one chunk at a time); whichever is left finishes it."""
    enqueue_replan(limit_id, event_id)
    if get_current_job() is None:  # run by hand, or by a test: the queued job will do
        return
    app = current_app._get_current_object()
    threading.Thread(
        target=_replan_beside, args=(app, limit_id, event_id), daemon=True, name="replan"
    ).start()


def _replan_beside(app, limit_id: int, event_id: int) -> None:
    with app.app_context():
        try:
            replan_limit(limit_id, event_id)
        except Exception:  # the queued job, or reconcile, goes on with it
            log.exception("re-plan %s of limit %s beside its slot job failed", event_id, limit_id)
        finally:
            db.session.remove()


def _refusals_written(written: list, failures: Mapping[int, Failure]) -> list[tuple]:
    """(row, refusal) of the outcomes written that were refusals, in their order."""
    verdicts = ((row, failures.get(row.user_id)) for row in written)
    return [(row, verdict) for row, verdict in verdicts if isinstance(verdict, Refused)]


@dataclass(frozen=True)
class _Rules:
    """What becomes of a claimed ID: the deployment's MAX_ATTEMPTS, the limit's
    max_refusals, the slot's length (a refusal's default wait) and the moment of
    recording, from which waits count."""

    max_attempts: int
    max_refusals: int
    slot_seconds: int
    now: datetime

    def verdict(self, item: Claim, failure: Failure | None, task_status: str | None):
        """(new status, error, retry at, whether it used an attempt) of one claimed ID."""
        if failure is None:
            return AssignmentStatus.DONE, None, None, True
        error = bounded(failure.message)
        if isinstance(failure, Refused):
            return self._after_refusal(item, failure, error, task_status)
        if not failure.retry or item.attempts + 1 >= self.max_attempts:
            return AssignmentStatus.FAILED, error, None, True
        if task_status == TaskStatus.CANCELLED:
            return AssignmentStatus.CANCELLED, error, None, True  # no retry for a cancelled task
        return AssignmentStatus.RETRYING, error, self.now + backoff(item.attempts + 1), True

    def _after_refusal(self, item: Claim, refusal: Refused, error: str, task_status):
        if item.refusals + 1 >= self.max_refusals:
            error = bounded(f"refused {item.refusals + 1} times in a row: {refusal.message}")
            return AssignmentStatus.FAILED, error, None, False
        if task_status == TaskStatus.CANCELLED:
            return AssignmentStatus.CANCELLED, error, None, False
        wait = timedelta(seconds=refusal_wait(refusal.retry_after, self.slot_seconds))
        return AssignmentStatus.RETRYING, error, self.now + wait, False


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
        store.count_on_task(task_id, *counts[task_id])
