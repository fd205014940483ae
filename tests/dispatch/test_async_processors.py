"""An `async def` per-ID processor is awaited on the slot job's event loop: each call at
its own turn, its outcomes recorded as a threaded one's are, cut short after its
longest call, and the calls not yet made handed back when the worker stops."""

import time

import pytest
from sqlalchemy import text

from service.core.extensions import db
from service.dispatch import claimers
from service.dispatch.slot_runs import run_slot
from service.limits.store import DEFAULT
from service.planning.windows import plan_stored_task
from service.processors.contract import is_async, load_processor

from .. import processors
from ..helpers import PAST, slots_by_id, submit

OUTCOMES = text(
    "SELECT user_id, status, attempts, error FROM assignments WHERE task_id = :t ORDER BY user_id"
)


def outcomes(task_id: int) -> list[tuple]:
    return [tuple(row) for row in db.session.execute(OUTCOMES, {"t": task_id})]


def run_past_slot(ids) -> tuple[int, object]:
    """Plan the IDs into a slot that has begun, and run it at once."""
    task_id = submit(ids)
    plan_stored_task(task_id, now=PAST)
    slot = db.session.execute(text("SELECT min(slot_start) FROM assignments")).scalar()
    db.session.commit()
    return task_id, run_slot(DEFAULT, slot)


def test_async_calls_start_at_their_own_turns_and_overlap(make_app):
    """Ten IDs a 1-s slot, two slots, calls of 0.2 s: each starts at its turn (slot
    start plus its place times 0.1 s) or just after, never ahead, so two calls are in
    flight at a time; every ID is done."""
    app = make_app(
        RPM=10,
        SLOT_SECONDS=1,
        WINDOW_SLOTS=5,
        PLAN_LEAD_SECONDS=0.2,
        ID_PROCESSOR="tests.processors:note_call_start_async",
    )
    processors.async_call_starts.clear()
    with app.app_context():
        task_id = submit(range(1, 21), overflow="defer")
        plan_stored_task(task_id)
        planned = slots_by_id(task_id)
        slots = sorted(set(planned.values()))
        runs = [run_slot(DEFAULT, slot) for slot in slots]
        statuses = {status for _, status, _, _ in outcomes(task_id)}
    assert len(slots) == 2
    assert [run.done for run in runs] == [10, 10]
    assert statuses == {"done"}
    late = []
    for user_id, started in processors.async_call_starts.items():
        turn = planned[user_id].timestamp() + ((user_id - 1) % 10) * 0.1
        assert started >= turn - 0.005, (user_id, started - turn)
        late.append(started - turn)
    assert sorted(late)[len(late) // 2] < 0.1  # on time, not queued behind earlier calls


@pytest.mark.parametrize(
    ("name", "threads"), [("fail_odd_sync", "processor_"), ("fail_odd_async", "processor-loop")]
)
def test_a_sync_and_an_async_processor_record_the_same_outcomes(make_app, name, threads):
    """The same verdicts, the same records; the plain one is called on the pool's
    threads, the async one on the slot job's loop."""
    app = make_app(ID_PROCESSOR=f"tests.processors:{name}", MAX_ATTEMPTS=3, SLOT_SECONDS=1)
    processors.call_threads.clear()
    with app.app_context():
        task_id, run = run_past_slot(range(1, 11))
        rows = outcomes(task_id)
    assert is_async(load_processor(f"tests.processors:{name}")) == name.endswith("async")
    assert (run.claimed, run.done, run.failed) == (10, 4, 6)
    assert [user_id for user_id, status, _, _ in rows if status == "done"] == [2, 4, 6, 8]
    errors = {user_id: error for user_id, status, _, error in rows if status == "retrying"}
    odd = dict.fromkeys([1, 3, 5, 7, 9], "odd")
    assert errors == {**odd, 10: "ValueError: no user 10"}
    assert {attempts for _, _, attempts, _ in rows} == {1}
    assert processors.call_threads
    assert all(thread.startswith(threads) for thread in processors.call_threads)


def test_an_async_call_is_cut_short_after_its_longest_call(make_app):
    app = make_app(ID_PROCESSOR="tests.processors:hang_async", SLOT_SECONDS=1)
    with app.app_context():
        began = time.monotonic()
        task_id, run = run_past_slot([1, 2])
        took = time.monotonic() - began
        rows = outcomes(task_id)
    assert (run.done, run.failed) == (0, 2)
    assert {error for _, _, _, error in rows} == {"the call lasted longer than its longest, 0.3 s"}
    assert {status for _, status, _, _ in rows} == {"retrying"}
    assert took < 5  # not the minute each call would have taken


def test_a_processors_own_timeout_fails_its_id_as_any_exception(make_app):
    """A TimeoutError of the processor's own (its wait for its downstream), not the
    slot job's cut: the ID fails with it, and the slot job goes on to its end."""
    app = make_app(ID_PROCESSOR="tests.processors:time_out_by_itself", SLOT_SECONDS=1)
    with app.app_context():
        task_id, run = run_past_slot([1, 2])
        rows = outcomes(task_id)
    assert (run.done, run.failed) == (0, 2)
    assert {error for _, _, _, error in rows} == {"TimeoutError: "}


def test_a_stop_hands_back_the_ids_whose_calls_have_not_begun(make_app, monkeypatch):
    """Ten IDs paced 0.2 s apart; the worker is asked to stop at ID 3's call: the calls
    begun end and are recorded, the others are never made and go back to pending."""
    monkeypatch.setattr(claimers, "_stop_requested", False)
    app = make_app(ID_PROCESSOR="tests.processors:stop_the_worker_at_3", SLOT_SECONDS=2)
    processors.async_call_starts.clear()
    with app.app_context():
        task_id, run = run_past_slot(range(1, 11))
        rows = outcomes(task_id)
    called = set(processors.async_call_starts)
    assert {1, 2, 3} <= called <= {1, 2, 3, 4}
    assert {user_id for user_id, status, _, _ in rows if status == "done"} == called
    pending = [user_id for user_id, status, _, _ in rows if status == "pending"]
    assert pending == [i for i in range(1, 11) if i not in called]
    assert run.done == len(called)
    assert run.handed_back + run.done == run.claimed


def test_async_calls_run_in_an_app_context_of_the_loop_s_own(make_app):
    app = make_app(ID_PROCESSOR="tests.processors:note_app_context", SLOT_SECONDS=1)
    processors.async_contexts.clear()
    with app.app_context():
        _, run = run_past_slot([1, 2, 3])
        slot_jobs_session = id(db.session())
    assert run.done == 3
    assert {name for name, _ in processors.async_contexts} == {app.name}
    assert slot_jobs_session not in {session for _, session in processors.async_contexts}
