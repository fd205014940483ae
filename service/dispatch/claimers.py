"""Who holds a claim, and whether it is still alive.

A slot job runs as a *claimer*: a number from the `claimer_ids` sequence, stood for by a
session advisory lock that a connection of its own holds while the job runs, together
with a shared lock on the slot. PostgreSQL drops both with the connection, so the moment
a worker dies (kill -9, a lost machine once TCP gives up) its claimer is gone from
`pg_locks`, and reconcile hands its IDs back at once instead of after
CLAIM_TIMEOUT_SECONDS, which stays for workers that are alive but stuck.

An RQ worker gives each job a claimer before it forks (`assign`), so that after the job,
however it ended, the worker can hand back what the job still held (`release_held_by`).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

from sqlalchemy import text

from service.core import locks
from service.core.extensions import db
from service.core.models import AssignmentStatus
from service.dispatch import store
from service.dispatch.claims import Claim, still_claimed
from service.limits.store import subtract_loads

# Sent by the worker to its work horse on a warm shutdown: finish the IDs under way,
# hand back the rest, return.
STOP_SIGNAL = signal.SIGUSR1

_assigned: int | None = None
_stop_requested = False


def new_claimer_id() -> int:
    claimer = store.new_claimer_id()
    db.session.commit()
    return claimer


def assign(claimer: int | None) -> None:
    """The claimer that the next slot job of this process (or of its fork) runs as."""
    global _assigned
    _assigned = claimer


def request_stop(signum=None, frame=None) -> None:
    """Signal handler: the slot job under way stops after the IDs it is processing."""
    global _stop_requested
    _stop_requested = True


def stop_requested() -> bool:
    return _stop_requested


class ClaimerLockBusy(Exception):
    """A claimer's lock is held by a session other than its own connection's."""


class Claimer:
    """A live claimer of a limit's slot: its number, and a connection of its own whose
    session holds its lock and a shared lock on the slot. Asking that connection whether
    rows are still this claim's answers two things at once: the lock still holds (the
    connection is alive), and no reconcile has taken the rows back. When the connection
    dies (PostgreSQL restarted), `take_again` takes both locks on a new one."""

    def __init__(self, claimer_id: int, limit_id: int, slot: datetime):
        self.id = claimer_id
        self._limit_id = limit_id
        self._slot_key = locks.slot_key(limit_id, slot)
        self._holder = None
        self._leading = False
        self.take_again()

    def take_again(self) -> None:
        """Hold both locks: still on the same connection if it answers (giving a held
        lock up, even for a moment, would let reconcile take this claimer for dead),
        else on a new one. Raises ClaimerLockBusy while another session still holds the
        claimer's lock (a connection that died without the server noticing yet)."""
        if self._holder is not None and self._answers():
            return
        self.close()
        holder = db.engine.connect()
        if not store.take_claimer_locks(holder, self.id, self._slot_key):
            holder.close()
            raise ClaimerLockBusy(f"claimer {self.id}'s lock is still held by another session")
        if self._leading:  # best effort: the limit's turns still come in one sequence
            store.take_runner_lock(holder, self._limit_id)
        holder.commit()
        self._holder = holder

    def lead(self) -> bool:
        """Whether this job may hand out its limit's turns now: it holds the limit's
        runner lock (no other slot of the limit is handing out turns), or a job of its
        own slot holds it (this one is a helper, and joins that run)."""
        self._leading = store.take_runner_lock(self._holder, self._limit_id)
        joining = not self._leading and store.slot_run_elsewhere(self._holder, self._slot_key)
        self._holder.commit()
        return self._leading or joining

    def stop_leading(self) -> bool:
        """Every turn of this job's slot is handed out: the limit's next slot may lead.
        True if this job was leading."""
        if not self._leading:
            return False
        self._leading = False
        # A connection that died dropped the lock with it; the ride-out takes a new one.
        with contextlib.suppress(Exception):
            store.drop_runner_lock(self._holder, self._limit_id)
            self._holder.commit()
        return True

    def _answers(self) -> bool:
        try:
            self._holder.execute(text("SELECT 1"))
            self._holder.commit()
            return True
        except Exception:  # dead: its locks went with it
            return False

    def still_ours(self, group: list[Claim]) -> list[Claim]:
        """The members of the group still claimed by this claimer; raises if its lock's
        connection is gone, when nothing can be known to be ours."""
        ours = still_claimed(self._holder, group, self.id)
        self._holder.commit()
        return ours

    def close(self) -> None:
        # Closing the session, not returning it to the pool, is what drops its locks.
        if self._holder is not None:
            with contextlib.suppress(Exception):  # a connection already dead drops them too
                self._holder.invalidate()
                self._holder.close()
            self._holder = None


@contextmanager
def claiming(limit_id: int, slot: datetime) -> Iterator[Claimer]:
    """Run as a live claimer of a limit's slot for the duration of the block."""
    claimer = Claimer(_assigned if _assigned is not None else new_claimer_id(), limit_id, slot)
    try:
        yield claimer
    finally:
        claimer.close()


def _release(which: str, **params) -> int:
    """Claimed IDs back to pending (cancelled if their task was); returns how many."""
    rows = store.release(which, **params)
    subtract_loads(
        {
            (row.limit_id, row.slot_start): row.n
            for row in rows
            if row.status == AssignmentStatus.CANCELLED
        }
    )
    db.session.commit()
    return sum(row.n for row in rows)


def release_held_by(claimer: int) -> int:
    """Hand back what a claimer still holds: its job has stopped."""
    return _release(store.HELD_BY, claimer=claimer)


def release_dead_or_stuck(timeout: timedelta, dead: bool = True) -> int:
    """Hand back IDs whose claimer is gone (unless `dead` is False), or whose claim has
    run out: its claimer is alive but stuck.

    A claim runs out at its `claimed_until`, which outlives the longest call its
    processor may make; claims made before claims had one, `timeout` after they were
    made. Claims made before claimers existed (no `claimed_by`) wait for that too.
    """
    which = f"{store.CLAIMER_GONE} OR {store.RAN_OUT}" if dead else store.RAN_OUT
    return _release(which, timeout=timeout)
