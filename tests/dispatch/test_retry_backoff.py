"""Retry backoff: a failed ID waits RETRY_BACKOFF_SECONDS, doubled for each further attempt."""

from datetime import UTC, datetime, timedelta

from sqlalchemy import text

from service.core.extensions import db
from service.dispatch.claimers import new_claimer_id
from service.dispatch.claims import claim
from service.dispatch.outcomes import record_outcomes
from service.limits.store import DEFAULT, SlotOfLimit
from service.planning.retries import plan_retries
from service.planning.windows import plan_stored_task
from service.processors.contract import Failure

from ..helpers import FIRST_SLOT, PAST, limit_id, submit

BACKOFF = timedelta(seconds=60)
# Far more than recording one ID takes even on a busy machine, and far less than the
# half or the double of a backoff, which a wrong doubling would give.
SLACK = timedelta(seconds=10)


def fail_once(task_id: int, slot_start: datetime) -> tuple[datetime, datetime]:
    """Claim the task's ID in its slot and record a failure to retry; returns the moment
    the recording began and the ID's retry_at."""
    claims = claim(limit_id(), slot_start, new_claimer_id(), 10).claims
    recorded_at = datetime.now(UTC)
    slot = SlotOfLimit(limit_id(), DEFAULT, slot_start)
    record_outcomes(slot, claims, {item.user_id: Failure("busy") for item in claims})
    return recorded_at, retry_at_of(task_id)


def retry_at_of(task_id: int) -> datetime:
    return db.session.execute(
        text("SELECT retry_at FROM assignments WHERE task_id = :t AND status = 'retrying'"),
        {"t": task_id},
    ).scalar_one()


def slot_of(task_id: int) -> datetime:
    return db.session.execute(
        text("SELECT slot_start FROM assignments WHERE task_id = :t AND status = 'pending'"),
        {"t": task_id},
    ).scalar_one()


def assert_waits(recorded_at: datetime, retry_at: datetime, wait: timedelta) -> None:
    assert recorded_at + wait <= retry_at < recorded_at + wait + SLACK, retry_at - recorded_at


def test_a_failed_id_waits_the_backoff_then_twice_that_after_its_second_failure(make_app):
    app = make_app(
        RPM=3, PACING=False, MAX_ATTEMPTS=3, RETRY_BACKOFF_SECONDS=BACKOFF.total_seconds()
    )
    with app.app_context():
        task_id = submit([5])
        plan_stored_task(task_id, now=PAST)
        assert_waits(*fail_once(task_id, FIRST_SLOT), BACKOFF)
        assert plan_retries() == 1  # into a slot after its retry_at, like any ID
        assert_waits(*fail_once(task_id, slot_of(task_id)), 2 * BACKOFF)
