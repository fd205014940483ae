"""A downstream answering in 200 ms, with real worker and scheduler processes: calls go
out at their turns, overlapping, and a slot too big for one job is shared by helpers."""

from datetime import UTC, datetime, timedelta

import pytest
from rq.job import Job
from sqlalchemy import text

from service.core.config import HTTP_PROCESSOR
from service.core.extensions import db, get_redis
from service.dispatch.pacing import step_of
from service.jobs import slot_job_id
from service.limits.store import DEFAULT
from service.planning import resume as pausing
from service.planning.windows import plan_stored_task

from ..downstream import Record, Server
from ..helpers import submit
from ..processes import start, stop, wait_until

pytestmark = pytest.mark.slow


def planned_turns(task_id: int) -> dict[int, tuple[datetime, int]]:
    """Each ID's slot and its place in it, in plan order."""
    rows = db.session.execute(
        text(
            "SELECT user_id, slot_start, row_number() OVER "
            "  (PARTITION BY slot_start ORDER BY task_id, position) - 1 AS place "
            "FROM assignments WHERE task_id = :t"
        ),
        {"t": task_id},
    )
    return {row.user_id: (row.slot_start, row.place) for row in rows}


def run_through(settings: dict, ids: range, workers: int, record: Record) -> int:
    with Server(record) as url:
        # Every process runs by the limit's processor and options, recorded in PostgreSQL.
        pausing.update_limit(DEFAULT, {"processor": HTTP_PROCESSOR, "options": {"url": url}})
        processes = [start(["scheduler"], settings)]
        processes += [start(["worker"], settings) for _ in range(workers)]
        try:
            task_id = submit(ids)
            # Planned as if 3 s from now: the processes have started by the first slot.
            plan_stored_task(task_id, now=datetime.now(UTC) + timedelta(seconds=3))
            wait_until(
                lambda: (
                    db.session.execute(
                        text("SELECT count(*) FROM assignments WHERE status = 'done'")
                    ).scalar()
                    == len(ids)
                ),
                60,
                "every ID to be done",
            )
        finally:
            stop(processes)
    return task_id


def test_calls_to_a_slow_downstream_arrive_at_their_turns(make_app):
    # 40 IDs a 2-s slot: a turn every 45 ms, a call taking 200 ms, about 5 in flight.
    settings = {"SLOT_SECONDS": 2, "WINDOW_SLOTS": 5, "PLAN_LEAD_SECONDS": 0.5, "RPM": 40}
    record = Record(latency=0.2)
    with make_app(**settings).app_context():
        task_id = run_through(settings, range(1, 81), workers=2, record=record)
        turns = planned_turns(task_id)
    step = step_of(2, 40)
    assert len(record.calls) == 80
    late = []
    for arrived, user_id, _, _ in record.calls:
        slot, place = turns[user_id]
        offset = arrived - slot.timestamp()
        assert 0 <= offset < 2, (user_id, offset)  # inside its own slot
        late.append(offset - place * step)
    # At its turn, within what a busy machine allows; one call after another would put
    # the last of each slot 7 s behind.
    assert max(abs(x) for x in late) < 1.0, sorted(late)[-5:]
    assert record.most_in_flight >= 3  # overlapping, not one after another


def test_a_slot_too_big_for_one_job_is_shared_by_helpers(make_app):
    # 120 IDs in a 4-s slot (33 a second) against one job's 3 calls of 200 ms (15 a second).
    settings = {
        "SLOT_SECONDS": 4,
        "WINDOW_SLOTS": 3,
        "PLAN_LEAD_SECONDS": 0.5,
        "RPM": 120,
        "PROCESSOR_ASYNC_CONCURRENCY": 3,
    }
    record = Record(latency=0.2)
    with make_app(**settings).app_context():
        task_id = run_through(settings, range(1, 121), workers=3, record=record)
        slot = min(slot for slot, _ in planned_turns(task_id).values())
        helpers = [
            job_id
            for number in range(1, 5)
            if Job.exists(job_id := f"{slot_job_id(DEFAULT, slot)}-helper-{number}", get_redis())
        ]
        assert helpers, "no helper job was added"
        users = len({user_id for _, user_id, _, _ in record.calls})
    assert (len(record.calls), users) == (120, 120)  # each ID called once
    span = max(arrived for arrived, *_ in record.calls) - slot.timestamp()
    assert span < 7.5, span  # one job alone would take 8 s
