"""A per-ID call's outcome is recorded within about a second of the call's end, whatever
the slot's next turn, and its `finished_at` is the call's end."""

import time

from sqlalchemy import text

from service.core.extensions import db
from service.dispatch.pacing import Clock
from service.dispatch.slot_runs import run_slot
from service.limits.store import DEFAULT
from service.planning.windows import plan_stored_task

from .. import processors
from ..helpers import PAST, submit

STATUS_AND_END = text(
    "SELECT status, extract(epoch FROM finished_at) AS finished FROM assignments "
    "WHERE user_id = :id"
)


def test_an_outcome_is_recorded_within_a_second_of_its_call_not_at_the_next_turn(make_app):
    # Two IDs in a slot of 6 s: their turns are 2.7 s apart.
    app = make_app(ID_PROCESSOR="tests.processors:note_call_end", SLOT_SECONDS=6)
    processors.call_ends.clear()
    seen_done: dict[int, float] = {}

    def watching_sleep(seconds: float) -> None:
        # The slot job sleeps only while it waits for a turn: look from outside whether
        # the first ID's outcome is in PostgreSQL yet.
        if 1 not in seen_done:
            with db.engine.connect() as observer:
                if observer.execute(STATUS_AND_END, {"id": 1}).one().status == "done":
                    seen_done[1] = time.time()
        time.sleep(seconds)

    with app.app_context():
        task_id = submit([1, 2])
        plan_stored_task(task_id, now=PAST)
        slot = db.session.execute(text("SELECT min(slot_start) FROM assignments")).scalar()
        db.session.commit()
        run = run_slot(DEFAULT, slot, clock=Clock(sleep=watching_sleep))
        first = db.session.execute(STATUS_AND_END, {"id": 1}).one()

    assert (run.claimed, run.done) == (2, 2)
    ends = processors.call_ends
    assert ends[1] + 2.0 < ends[2]  # the turns were apart: a wait came between them
    assert 1 in seen_done, "the first outcome was recorded only after the second call"
    assert seen_done[1] - ends[1] < 1.0
    assert abs(float(first.finished) - ends[1]) < 0.2  # the call's end, not the recording
