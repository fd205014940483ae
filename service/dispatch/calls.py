"""How a slot job hands its claimed IDs to its limit's processor: a group processor
gets each paced group in the transaction that records it; a per-ID processor gets each
ID at its turn, an `async def` one on an event loop, a plain one on a pool of threads,
its outcomes recorded in batches.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime

from flask import current_app

from service.dispatch import claimers
from service.dispatch.claimers import Claimer
from service.dispatch.claims import Claim, hold
from service.dispatch.outcomes import Tally, process_and_record, record_outcomes
from service.dispatch.pacing import PACING_TICK_SECONDS, Clock
from service.limits.learning import seen_accepting
from service.limits.store import SlotOfLimit
from service.processors.contract import (
    Failure,
    as_failure,
    close,
    is_async,
    is_per_id,
    longest_call,
    prepare,
    takes,
)

log = logging.getLogger(__name__)

# A per-ID processor's outcomes are recorded this often, whether the slot job is handing
# out IDs or waiting for the next turn or for the last calls: an ID shows its outcome
# within about this of its call's end.
RECORD_EVERY_SECONDS = 0.25
# A per-ID processor's group is checked and handed over this long before its turn, and
# each call then starts at its own turn: the check's round trip to PostgreSQL, and a busy
# machine's delay in waking the slot job's thread, come out of this lead instead of
# making the call late. The claim's expiry is checked again at the call itself.
HAND_AHEAD_SECONDS = 0.1
# An async per-ID processor's IDs whose turns fall within this of a group's first are
# handed over with it, in one check of their claims: at 1,000 IDs a second that check
# was the slot job's costliest statement at a group every 50 ms. A call waiting for its
# turn costs a timer on the loop, not a thread of the pool. Each call still starts at
# its own turn, and checks its claim's deadline there.
LOOP_GROUP_SECONDS = 0.2
# What a call that was not made (its claim could have run out mid-call) gives back.
NOT_CALLED = object()


@dataclass(frozen=True)
class Ended:
    """A per-ID call that was made: its verdict, and when it ended (an ID's
    `finished_at` is its call's end, not the moment it was recorded)."""

    failure: Failure | None
    at: datetime


def calls_for(
    slot: SlotOfLimit,
    claimer: Claimer,
    processor: Callable,
    clock: Clock,
    max_attempts: int,
    slot_seconds: int,
):
    if is_async(processor):
        kind = LoopCalls
    elif is_per_id(processor):
        kind = ConcurrentCalls
    else:
        kind = GroupCalls
    return kind(slot, claimer, processor, clock, max_attempts, slot_seconds)


class _Calls:
    """How a slot job hands its claimed IDs to its limit's processor."""

    # How long before its turn a group is handed over, and how many seconds of turns
    # it spans.
    lead = 0.0
    tick = PACING_TICK_SECONDS

    def __init__(
        self,
        slot: SlotOfLimit,
        claimer: Claimer,
        processor: Callable,
        clock: Clock,
        max_attempts: int,
        slot_seconds: int = 60,
    ):
        self.slot, self.claimer, self.processor, self.clock = slot, claimer, processor, clock
        self.max_attempts, self.slot_seconds = max_attempts, slot_seconds
        self.tally = Tally()

    def hold_back(self) -> None:
        """Start no more calls."""

    def wait_under_way(self) -> None:
        """Wait for the calls under way to end."""

    def go_on(self) -> None:
        """Calls may start again."""

    def record_finished(self) -> None:
        """Record the outcomes of the calls that ended and are not recorded yet."""

    def record_due(self) -> None:
        """Record what has ended, if RECORD_EVERY_SECONDS have passed since the last time
        (called while the slot job waits)."""

    def finish(self) -> None:
        """Wait for the calls under way and record them."""

    def abandon(self) -> None:
        """Start no more calls: the job is ending."""


class GroupCalls(_Calls):
    """A group processor gets each paced group at once, in the transaction that records
    the group's outcomes: locking the rows still claimed there is the check before the
    call, so each ID runs exactly once. The claimer's lock is checked first too, so
    that a job whose lock went with its connection takes it again (reconcile would
    otherwise take its slot for one whose job is gone)."""

    def hand(self, group: list[Claim], turn: float, step: float = 0.0) -> None:
        ours = self.claimer.still_ours(group)
        self.tally += process_and_record(
            self.slot, self.claimer.id, ours, self.processor, self.max_attempts
        )

    def behind(self, turn: float) -> float:
        """How late the calls start against their turns."""
        return self.clock.seconds() - turn


class ConcurrentCalls(_Calls):
    """A per-ID processor gets each ID at its turn on a pool of threads, whatever the
    calls before it are still waiting for; outcomes are recorded in batches, each in a
    transaction that keeps only the IDs the claim still holds.

    No call is made that could overlap another of the same ID: each group is checked
    against the claimer's lock and rows right before it is handed to the pool (one
    query, HAND_AHEAD_SECONDS before the group's turn), and a call starts only while its
    claim holds for longer than the longest call the processor may make.
    """

    lead = HAND_AHEAD_SECONDS

    def __init__(self, *args):
        super().__init__(*args)
        self.app = current_app._get_current_object()
        options = self.slot.options
        self.extra = {"options": options} if takes(self.processor, "options") else {}
        self.longest = longest_call(self.processor, options) or 0.0
        self.abandoned = self.holding = False
        self._start_runner()
        self.in_flight: list[tuple[Claim, Future]] = []
        # Outcomes of calls that ended, with when, kept until a transaction has recorded
        # them.
        self.unrecorded: list[tuple[Claim, Ended]] = []
        self.recorded_at = time.monotonic()
        self.start_lag = 0.0
        # When calls that succeeded ended, over about the last slot: what the downstream
        # was seen to accept, should it refuse.
        self.accepted_ends: deque[float] = deque()
        self.first_call_at: float | None = None
        try:
            self._prepare(options)
        except Exception:  # the calls will meet it, and say what it is
            log.exception("preparing the processor of %s failed", self.slot.limit_name)

    def _start_runner(self) -> None:
        concurrency = self.app.config["PROCESSOR_CONCURRENCY"]
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="processor")

    def _prepare(self, options: dict) -> None:
        prepare(self.processor, options)

    def hand(self, group: list[Claim], turn: float, step: float = 0.0) -> None:
        """Each ID of the group still claimed goes to the pool, to be called at its own
        turn (`turn` is the first's, the others follow `step` apart): never ahead of it."""
        turns = {(item.task_id, item.position): turn + k * step for k, item in enumerate(group)}
        for item in self.claimer.still_ours(group):
            own = turns[(item.task_id, item.position)]
            self.in_flight.append((item, self.pool.submit(self._call, item, own)))
        self.record_due()

    def record_due(self) -> None:
        if time.monotonic() - self.recorded_at >= RECORD_EVERY_SECONDS:
            self.record_finished()

    def behind(self, turn: float) -> float:
        """How late the latest call started against its turn: with every thread busy,
        calls wait in the pool's queue."""
        return max(self.clock.seconds() - turn, self.start_lag)

    def finish(self) -> None:
        # Each call's outcome as it ends, not once the slowest has.
        while self.in_flight:
            futures = [future for _, future in self.in_flight]
            wait(futures, timeout=RECORD_EVERY_SECONDS, return_when=FIRST_COMPLETED)
            self.record_finished()
        self.record_finished()
        self._stop_runner()

    def _stop_runner(self) -> None:
        self.pool.shutdown()

    def abandon(self) -> None:
        self.abandoned = True
        self.pool.shutdown(wait=False, cancel_futures=True)

    def hold_back(self) -> None:
        self.holding = True

    def wait_under_way(self) -> None:
        wait([future for _, future in self.in_flight])

    def go_on(self) -> None:
        self.holding = False

    def record_finished(self) -> None:
        self.recorded_at = time.monotonic()
        finished = self._take_finished()
        self._note_accepted([ended for _, ended in finished])
        self.unrecorded += finished
        if not self.unrecorded:
            return
        held = hold([item for item, _ in self.unrecorded], self.claimer.id)
        failures = {item.user_id: ended.failure for item, ended in self.unrecorded if ended.failure}
        ended_at = {(item.task_id, item.position): ended.at for item, ended in self.unrecorded}
        seen = self._seen_accepting() if failures else None
        self.tally += record_outcomes(
            self.slot, held, failures, self.max_attempts, ended_at, seen_accepting=seen
        )
        self.unrecorded = []

    def _note_accepted(self, ended: list[Ended]) -> None:
        horizon = self.clock.seconds() - self.slot_seconds
        self.accepted_ends.extend(e.at.timestamp() for e in ended if e.failure is None)
        while self.accepted_ends and self.accepted_ends[0] < horizon:
            self.accepted_ends.popleft()

    def _seen_accepting(self) -> float | None:
        if self.first_call_at is None:
            return None
        ends, now = list(self.accepted_ends), self.clock.seconds()
        return seen_accepting(ends, now, self.first_call_at, self.slot_seconds)

    def _call(self, item: Claim, turn: float) -> Ended | object:
        self.clock.wait_until(turn, lambda: self.abandoned or self.holding)
        if self.abandoned or self.holding or time.monotonic() + self.longest > item.holds_until:
            # Not called: the job is ending or waiting for PostgreSQL, or the claim may
            # run out mid-call. The ID is handed back and claimed again.
            return NOT_CALLED
        self.start_lag = self.clock.seconds() - turn
        if self.first_call_at is None:
            self.first_call_at = self.clock.seconds()
        with self.app.app_context():
            try:
                verdict = self.processor(item.user_id, item.key(self.slot.deployment), **self.extra)
                failure = as_failure(verdict)
            except Exception as exc:  # a processor's bug fails its ID, not the slot
                log.exception("processor failed on ID %s", item.user_id)
                failure = Failure(f"{type(exc).__name__}: {exc}")
        return Ended(failure, self.clock.now())

    def _take_finished(self) -> list[tuple[Claim, Ended]]:
        finished = [(item, future) for item, future in self.in_flight if future.done()]
        self.in_flight = [pair for pair in self.in_flight if not pair[1].done()]
        outcomes = [(item, future.result()) for item, future in finished]
        return [(item, verdict) for item, verdict in outcomes if verdict is not NOT_CALLED]


class LoopCalls(ConcurrentCalls):
    """An async per-ID processor's calls, awaited on one event loop in a thread of the
    slot job: thousands in flight cost a task each, not a thread each. Each call waits
    for its own turn on a timer of the loop, starts only while its claim holds for
    longer than the longest call, and is cut short once it has lasted that long. The
    slot job's own thread claims, checks and records, as for the thread pool.

    Calls still waiting for their turns when the worker is asked to stop, or when
    PostgreSQL goes away, are not made: their IDs are handed back. Calls under way then
    end, and are recorded."""

    tick = LOOP_GROUP_SECONDS

    def _start_runner(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.room = asyncio.Semaphore(self.app.config["PROCESSOR_ASYNC_CONCURRENCY"])
        self.waiting: set[asyncio.Task] = set()  # touched on the loop's thread only
        self.tasks: set[asyncio.Task] = set()
        started = threading.Event()
        self.thread = threading.Thread(
            target=self._run_loop, args=(started,), daemon=True, name="processor-loop"
        )
        self.thread.start()
        started.wait()

    def _run_loop(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        # An app context of the loop's own: a processor that reads current_app (or a
        # session) never shares the slot job's.
        with self.app.app_context():
            self.context = contextvars.copy_context()
            started.set()
            self.loop.run_forever()

    def _on_loop(self, coroutine) -> None:
        """Run a coroutine on the loop, in the loop's app context, and wait for it."""
        done: Future = Future()

        def start() -> None:
            task = self.loop.create_task(coroutine)
            task.add_done_callback(lambda ended: _settle(done, ended))

        self.loop.call_soon_threadsafe(start, context=self.context)
        done.result()

    def _prepare(self, options: dict) -> None:
        async def prepared():
            made = prepare(self.processor, options)
            if asyncio.iscoroutine(made):
                await made

        self._on_loop(prepared())

    def hand(self, group: list[Claim], turn: float, step: float = 0.0) -> None:
        """Each ID of the group still claimed gets a task on the loop, which starts its
        call at its own turn: one hand-over to the loop's thread per group."""
        calls = []
        for k, item in enumerate(self.claimer.still_ours(group)):
            ended = Future()
            self.in_flight.append((item, ended))
            calls.append((item, turn + k * step, ended))
        if calls:
            self.loop.call_soon_threadsafe(self._start_calls, calls, context=self.context)
        self.record_due()

    def _start_calls(self, calls: list) -> None:
        for item, turn, ended in calls:
            task = self.loop.create_task(self._at_turn(item, turn, ended))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _at_turn(self, item: Claim, turn: float, ended: Future) -> None:
        task = asyncio.current_task()
        self.waiting.add(task)
        try:
            delay = turn - self.clock.seconds()
            if delay > 0:
                await asyncio.sleep(delay)
            await self.room.acquire()
        except asyncio.CancelledError:  # stopping, or PostgreSQL away: not called
            ended.set_result(NOT_CALLED)
            return
        finally:
            self.waiting.discard(task)
        try:
            ended.set_result(await self._call_now(item, turn))
        finally:
            self.room.release()
            # Cancelled mid-call, the job is ending: nothing more is recorded. Whatever
            # ended the task, the slot job must not wait for it for ever.
            if not ended.done():
                ended.set_result(NOT_CALLED)

    async def _call_now(self, item: Claim, turn: float) -> Ended | object:
        if self.abandoned or self.holding or claimers.stop_requested():
            return NOT_CALLED
        if time.monotonic() + self.longest > item.holds_until:
            return NOT_CALLED  # the claim may run out mid-call: claimed again instead
        self.start_lag = self.clock.seconds() - turn
        if self.first_call_at is None:
            self.first_call_at = self.clock.seconds()
        key = item.key(self.slot.deployment)
        limit = asyncio.timeout(self.longest or None)
        try:
            async with limit:
                verdict = await self.processor(item.user_id, key, **self.extra)
            failure = as_failure(verdict)
        except Exception as exc:
            failure = self._failure_of(item, exc, limit.expired())
        return Ended(failure, self.clock.now())

    def _failure_of(self, item: Claim, exc: Exception, cut_short: bool) -> Failure:
        """A call cut short after its longest, or a processor's exception (its own
        TimeoutError among them): the ID's failure, not the slot's."""
        if cut_short and isinstance(exc, TimeoutError):
            return Failure(f"the call lasted longer than its longest, {self.longest:g} s")
        log.error("processor failed on ID %s", item.user_id, exc_info=exc)
        return Failure(f"{type(exc).__name__}: {exc}")

    def _cancel_waiting(self) -> None:
        """Calls not yet started are not made (their IDs are handed back)."""
        self.loop.call_soon_threadsafe(_cancel_all, self.waiting)

    def hold_back(self) -> None:
        super().hold_back()
        self._cancel_waiting()

    def finish(self) -> None:
        if claimers.stop_requested():
            self._cancel_waiting()
        super().finish()

    def _stop_runner(self) -> None:
        try:
            self._on_loop(close(self.processor, self.slot.options))
        except Exception:  # nothing is left to record: say so, and end the loop anyway
            log.exception("closing the processor of %s failed", self.slot.limit_name)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()

    def abandon(self) -> None:
        self.abandoned = True
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(_cancel_all, self.tasks)
        self.loop.call_soon_threadsafe(self.loop.stop)


def _cancel_all(tasks: set[asyncio.Task]) -> None:
    for task in list(tasks):
        task.cancel()


def _settle(done: Future, task: asyncio.Task) -> None:
    if task.cancelled():
        done.cancel()
    elif task.exception() is not None:
        done.set_exception(task.exception())
    else:
        done.set_result(task.result())
