"""Running a limit's slot: wait for its start, claim its IDs batch by batch, hand each to
the limit's processor at its turn, record the outcomes; add helper jobs when the slot
runs behind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from flask import current_app

from service.core.extensions import db
from service.core.outages import (
    Backoff,
    describe,
    forget_session,
    is_database_outage,
    wait_for_servers,
)
from service.dispatch import claimers, store
from service.dispatch.calls import calls_for
from service.dispatch.claimers import Claimer, ClaimerLockBusy
from service.dispatch.claims import Batch, claim, deployment_id, mark_tasks_running
from service.dispatch.outcomes import start_replan
from service.dispatch.pacing import SYSTEM_CLOCK, Clock, paced_groups, step_of
from service.jobs import add_slot_helper, run_slot_again, run_slot_now
from service.limits import rates
from service.limits import store as limits
from service.limits.settings import shared
from service.limits.store import SlotOfLimit
from service.processors.contract import (
    NOT_MARKED,
    is_processor,
    load_processor,
    longest_call,
    refusing,
    why_held,
)

# The package's name, as before the package existed: log filters select slot runs by it.
log = logging.getLogger("service.dispatch")

# IDs claimed at once when not pacing.
CLAIM_BATCH = 500
# With pacing on, a claim takes about this many seconds' worth of IDs.
CLAIM_AHEAD_SECONDS = 1.0
# A slot job that met an outage asks whether PostgreSQL is back this often (doubling):
# soon enough to take its claimer's lock again before reconcile gives its IDs away.
RIDE_OUT_FIRST_WAIT = 0.5
RIDE_OUT_LONGEST_WAIT = 2.0
# A claim of a processor whose calls may last long outlives its longest call by this.
CLAIM_MARGIN_SECONDS = 5.0
# A slot job whose limit's turns are being handed out by another of its slots steps
# aside: it gives its worker up, to be run again once the turns of the slots before it
# are expected to be handed out (at least STEP_ASIDE_SECONDS, at most
# STEP_ASIDE_LONGEST_SECONDS from now), or as soon as the slot leading ends. At its
# slot's start, when less than LEAD_WAIT_SECONDS of turns are left before it (the slot
# before it is handing out its last ones), it waits that long for them first. A limit's
# late slots hold one worker between them, not every worker.
LEAD_WAIT_SECONDS = 1.0
LEAD_POLL_SECONDS = 0.05
STEP_ASIDE_SECONDS = 2.0
STEP_ASIDE_LONGEST_SECONDS = 30.0
# A slot job this far behind its turns asks for a helper, at most once per HELP_EVERY.
HELP_WHEN_BEHIND_SECONDS = 0.5
HELP_EVERY_SECONDS = 2.0


@dataclass(frozen=True)
class SlotRun:
    """What a slot job did; RQ keeps it as the job's result, the dashboard shows it, the
    worker logs it."""

    limit: str
    slot: datetime
    claimed: int  # IDs this run took from the slot
    done: int
    failed: int  # attempts that failed, to be retried or not
    handed_back: int  # claimed but not processed: its worker was asked to stop
    lateness_seconds: float  # from the slot's start to this run's first claim
    paused: bool = False  # its limit was paused: it stopped claiming, or never began
    stopped_before_start: bool = False  # its worker was asked to stop while it waited
    held: bool = False  # its limit's destination is not allowed here: it never began
    refused: int = 0  # calls the downstream refused for now, to be planned again
    stepped_aside: bool = False  # another slot of its limit ran: it is run again later

    @property
    def processed(self) -> int:
        return self.done + self.failed + self.refused


def run_slot(limit_name: str, start: datetime, clock: Clock = SYSTEM_CLOCK) -> SlotRun:
    """Process every pending ID of a limit's slot: wait for its start, then claim, pace,
    record.

    A slot job that runs behind its turns (its processor is slower than the slot's rate)
    adds helper jobs for the same slot, which share its IDs through the same claims and
    turns. Stops early, handing back what it has claimed but not processed, when its
    worker is asked to shut down. Claims nothing once its limit is paused, which it
    asks before each claim: the IDs left stay pending for the resume to plan again; nor
    when its limit is held (service/limits/held.py). PostgreSQL going away mid-slot is
    ridden out: the job waits for it and goes on.

    One slot of a limit hands out the limit's turns at a time (they come in one
    sequence anyway): a job that finds another slot of its limit doing so steps aside,
    to be run again when the turns before its own are expected to be done, rather than
    holding a worker that another limit's slot may need.
    """
    limit = limits.find(limit_name)
    if limit is None:  # deleted: none of its IDs was waiting
        return SlotRun(limit_name, start, 0, 0, 0, 0, 0.0)
    slot = SlotOfLimit.of(limit, start, deployment_id())
    processor = _processor_to_run(slot.processor)
    held = why_held(processor, slot.options)
    if held:
        return _hold(slot, held)
    # Neither may change while this slot's IDs wait (MAX_ATTEMPTS may, but a change
    # applying from the next slot is soon enough), so they are read once per run.
    settings = shared()
    db.session.commit()
    slot_seconds, max_attempts = settings["SLOT_SECONDS"], settings["MAX_ATTEMPTS"]
    with claimers.claiming(slot.limit_id, start) as claimer:
        calls = calls_for(slot, claimer, processor, clock, max_attempts, slot_seconds)
        runner = _Claims(
            slot, claimer, calls, clock, slot_seconds, claim_life(processor, slot.options)
        )
        clock.wait_until(start.timestamp(), claimers.stop_requested)
        # A stop asked for before the slot began ends the wait early: not lateness.
        early = clock.seconds() < start.timestamp()
        lateness = max(0.0, clock.seconds() - start.timestamp())
        ahead = None if early else _wait_to_lead(claimer, slot, clock, slot_seconds, lateness)
        if ahead is not None:
            calls.finish()
            return _step_aside(slot, round(lateness, 3), ahead)
        try:
            claimed, paused = runner.run()
            if claimer.stop_leading():
                _hand_lead_on(slot)
            handed_back = runner.finish()
        except BaseException:
            # A bug, a stop while PostgreSQL is away, or the job's time is up: no call
            # starts from now on. Reconcile hands the rest back once this job's
            # connection is gone.
            calls.abandon()
            raise
    tally = calls.tally
    run = SlotRun(
        limit_name,
        start,
        claimed,
        tally.done,
        tally.failed,
        handed_back,
        round(lateness, 3),
        paused,
        early,
        refused=tally.refused,
    )
    if tally.done and not tally.refused:
        _raise_if_quiet(slot, slot_seconds)
    _log_run(run)
    return run


def _raise_if_quiet(slot: SlotOfLimit, slot_seconds: int) -> None:
    """A slot that ran without a refusal may end the quiet period of a learned rate."""
    change = rates.raise_if_quiet(slot.limit_id, slot_seconds)
    db.session.commit()
    if change is not None:
        start_replan(slot.limit_id, change.event_id)


class _Claims:
    """A slot job's claims, batch after batch, each group handed out at its turn; an
    outage of PostgreSQL on the way is ridden out, not a reason to stop."""

    def __init__(
        self,
        slot: SlotOfLimit,
        claimer: Claimer,
        calls,
        clock: Clock,
        slot_seconds: int,
        life: timedelta,
    ):
        self.slot, self.claimer, self.calls, self.clock = slot, claimer, calls, clock
        self.slot_seconds, self.life = slot_seconds, life
        self.helping = _Helpers(slot, clock)
        self.taken = 0  # by the batch under way

    def run(self) -> tuple[int, bool]:
        """Claim until the slot has no pending ID left, or the limit is paused, or the
        worker is stopping; returns (IDs claimed, paused)."""
        claimed, paused = 0, False
        while not claimers.stop_requested() and not paused:
            try:
                taken, paused = self._claim_and_hand()
            except Exception as error:
                if not is_database_outage(error):
                    raise
                claimed += self.taken
                self._ride_out(error)
                continue
            if not taken and not paused:
                break
            claimed += taken
        return claimed, paused

    def finish(self) -> int:
        """Wait for the calls under way, record them, hand back what is left; returns
        how many were handed back."""
        while True:
            try:
                self.calls.finish()
                return claimers.release_held_by(self.claimer.id)
            except Exception as error:
                if not is_database_outage(error):
                    raise
                self._ride_out(error)

    def _claim_and_hand(self) -> tuple[int, bool]:
        """One batch; returns how many were claimed, and whether the limit is paused."""
        slot = self.slot
        self.taken = 0
        size = _batch_size_unless_paused(slot, self.slot_seconds)
        if size is None:
            db.session.commit()
            return 0, True
        batch = claim(
            slot.limit_id,
            slot.start,
            self.claimer.id,
            size,
            self.clock.now(),
            self.slot_seconds,
            self.life,
        )
        self.taken = len(batch.claims)
        if batch.claims:
            mark_tasks_running({c.task_id for c in batch.claims})
        step = batch.step if current_app.config["PACING"] else 0.0
        for turn, group in _groups(batch, self.clock, self.calls):
            self.calls.hand(group, turn, step)
            self.helping.note(self.calls.behind(turn))
        return len(batch.claims), False

    def _ride_out(self, error: Exception) -> None:
        """PostgreSQL went away mid-slot (or dropped this job's connections). Start no
        call; let those under way end; once PostgreSQL answers again, take the claimer's
        lock again, record what the calls did while their claims are still this job's,
        and hand back what was claimed but not called. The slot then goes on, late and
        paced: nothing called is called again, unless reconcile took the claims first."""
        what = f"slot {self.slot.start.isoformat()} of {self.slot.limit_name}"
        log.warning("%s: %s; going on once PostgreSQL answers", what, describe(error))
        self.calls.hold_back()
        # The lock first: until it is held again, reconcile may take this job for dead.
        self._until_back(self.claimer.take_again, what)
        self.calls.wait_under_way()
        self._until_back(self._record_and_hand_back, what)
        self.calls.go_on()

    def _until_back(self, attempt: Callable[[], object], what: str) -> None:
        backoff = Backoff(RIDE_OUT_FIRST_WAIT, RIDE_OUT_LONGEST_WAIT)
        wait_for_servers(
            attempt,
            what,
            stopping=claimers.stop_requested,
            backoff=backoff,
            also_retry=(ClaimerLockBusy,),
        )

    def _record_and_hand_back(self) -> None:
        forget_session()
        self.claimer.take_again()
        self.calls.record_finished()
        claimers.release_held_by(self.claimer.id)


def _wait_to_lead(
    claimer: Claimer, slot: SlotOfLimit, clock: Clock, slot_seconds: int, lateness: float
):
    """None once this job may hand out its limit's turns; else the seconds of turns that
    the pending IDs of the limit's slots before this one still take, for which it steps
    aside. It waits, LEAD_WAIT_SECONDS at most, only at its slot's start when those come
    to less than that (the slot before it handing out its last turns). A late slot (one
    that stepped aside before, or behind a backlog) leaves at once: the slot leading
    hands the lead on when it ends, and a worker waiting for it is one that another
    limit's slot may need. Without pacing there is no sequence of turns to wait for."""
    if not current_app.config["PACING"] or claimer.lead():
        return None
    ahead = store.slots_of_turns_before(slot.limit_id, slot.start) * slot_seconds
    db.session.commit()
    if ahead < LEAD_WAIT_SECONDS and lateness < LEAD_WAIT_SECONDS:
        give_up_at = clock.seconds() + LEAD_WAIT_SECONDS
        while clock.seconds() < give_up_at and not claimers.stop_requested():
            clock.sleep(LEAD_POLL_SECONDS)
            if claimer.lead():
                return None
    return ahead


def _step_aside(slot: SlotOfLimit, lateness: float, ahead: float) -> SlotRun:
    wait = min(max(ahead, STEP_ASIDE_SECONDS), STEP_ASIDE_LONGEST_SECONDS)
    again = datetime.now(UTC) + timedelta(seconds=wait)
    run_slot_again(slot.limit_name, slot.start, again)
    log.info(
        "slot %s of %s: stepped aside, another slot of its limit is handing out its "
        "turns; run again at %s",
        slot.start.isoformat(),
        slot.limit_name,
        again.isoformat(),
        extra={"fields": {"limit": slot.limit_name, "slot": slot.start.isoformat()}},
    )
    return SlotRun(slot.limit_name, slot.start, 0, 0, 0, 0, lateness, stepped_aside=True)


def _hand_lead_on(slot: SlotOfLimit) -> None:
    """Every turn of this slot is handed out: the earliest other slot of the limit that
    has begun and holds pending IDs (one that stepped aside) is run now, not when it
    was to come back."""
    try:
        waiting = store.slots_with_pending_ids(slot.limit_id, datetime.now(UTC))
        db.session.commit()
    except Exception as error:
        if not is_database_outage(error):
            raise
        # Those that stepped aside come back at their time; this slot rides it out next.
        forget_session()
        return
    others = [start for start in waiting if start != slot.start]
    if others:
        run_slot_now(slot.limit_name, min(others))


def _hold(slot: SlotOfLimit, reason: str) -> SlotRun:
    """A held limit's slot claims nothing, as a paused one's: its IDs stay pending, to
    be planned again once its destination is allowed. The limit is marked held, so that
    the process that first finds it allowed knows to."""
    limits.mark_held(slot.limit_id)
    db.session.commit()
    log.warning(
        "slot %s of %s: nothing claimed, its limit is held: %s",
        slot.start.isoformat(),
        slot.limit_name,
        reason,
        extra={"fields": {"limit": slot.limit_name, "slot": slot.start.isoformat()}},
    )
    return SlotRun(slot.limit_name, slot.start, 0, 0, 0, 0, 0.0, held=True)


def _log_run(run: SlotRun) -> None:
    started = (
        "stopped before its start"
        if run.stopped_before_start
        else f"started {run.lateness_seconds:.3f} s late"
    )
    log.info(
        "slot %s of %s: %d claimed, %d done, %d failed, %d refused, %d handed back, %s%s",
        run.slot.isoformat(),
        run.limit,
        run.claimed,
        run.done,
        run.failed,
        run.refused,
        run.handed_back,
        started,
        ", its limit paused" if run.paused else "",
        extra={
            "fields": {
                "limit": run.limit,
                "slot": run.slot.isoformat(),
                "claimed": run.claimed,
                "processed": run.processed,
                "done": run.done,
                "failed": run.failed,
                "refused": run.refused,
                "handed_back": run.handed_back,
                "lateness_seconds": run.lateness_seconds,
                "paused": run.paused,
                "stopped_before_start": run.stopped_before_start,
            }
        },
    )


def _processor_to_run(path: str) -> Callable:
    """The limit's processor, checked again here: the row may have been written while
    PROCESSOR_MODULES allowed more, or by hand. One that may not run fails its IDs for
    good, saying why, rather than the slot failing and being run again for ever."""
    if path.partition(":")[0] not in current_app.config["ALLOWED_PROCESSOR_MODULES"]:
        return refusing(path, "is outside PROCESSOR_MODULES: not imported")
    loaded = load_processor(path)
    if not is_processor(loaded):
        return refusing(path, f"is not marked as a processor ({NOT_MARKED})")
    return loaded


def claim_life(processor: Callable, options: dict) -> timedelta:
    """How long a claim holds even if its worker looks stuck: CLAIM_TIMEOUT_SECONDS, or
    longer for a processor whose calls may last longer than that, so that no call is
    still under way when its ID could be claimed again."""
    timeout = current_app.config["CLAIM_TIMEOUT_SECONDS"]
    longest = longest_call(processor, options)
    if longest is None:  # a group processor: its transaction holds its rows' locks
        return timedelta(seconds=timeout)
    return timedelta(seconds=max(timeout, longest + CLAIM_AHEAD_SECONDS + CLAIM_MARGIN_SECONDS))


class _Helpers:
    """Adds a helper job for the slot when its job runs behind its turns."""

    def __init__(self, slot: SlotOfLimit, clock: Clock):
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
        if add_slot_helper(self.slot.limit_name, self.slot.start, self.limit):
            log.info(
                "slot %s of %s runs %.1f s behind its turns: helper added",
                self.slot.start,
                self.slot.limit_name,
                behind,
            )


def _batch_size_unless_paused(slot: SlotOfLimit, slot_seconds: int) -> int | None:
    """How many IDs the next claim takes, or None once the limit is paused: both read
    afresh before each claim, in one statement."""
    row = store.paused_and_load(slot.limit_id, slot.start)
    if row is None or row.paused:  # a limit deleted meanwhile has nothing left to claim
        return None
    if not current_app.config["PACING"]:
        return CLAIM_BATCH
    step = step_of(slot_seconds, row.load or 0)
    return max(1, min(CLAIM_BATCH, round(CLAIM_AHEAD_SECONDS / step)))


def _groups(batch: Batch, clock: Clock, calls):
    if not current_app.config["PACING"]:
        return [(clock.seconds(), batch.claims)]
    return paced_groups(
        batch.claims,
        batch.first_turn,
        batch.step,
        clock,
        claimers.stop_requested,
        calls.record_due,
        calls.lead,
        calls.tick,
    )
