"""The RQ worker that `flask worker` runs: RQ's forking worker, plus claimers.

Before it forks a job it gives the job a claimer (service/claimers.py); after the job,
however it ended (finished, crashed, killed by a cold shutdown), it hands back whatever
that claimer still holds, so no ID waits for a timeout because its worker stopped. On a
warm shutdown (the first Ctrl-C or SIGTERM) it asks the running slot job to stop after
the IDs it is processing, rather than waiting for the rest of the slot.

Neither server being away stops it: a claimer that cannot be had lets the job run
without one (it fails at once if PostgreSQL is away, and reconcile runs it again), a
hand-back that cannot be made is left to reconcile (the claimer's lock went with the
job's connection), and `serve` starts RQ's loop again, after a capped backoff, whenever
Redis or PostgreSQL ended it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable

from redis.exceptions import RedisError
from rq import Queue, Worker
from rq.exceptions import StopRequested

from service.core.outages import (
    Backoff,
    describe,
    forget_session,
    is_outage,
    keep_running,
    sleep_unless,
)
from service.dispatch import claimers

log = logging.getLogger(__name__)


class ClaimingWorker(Worker):
    def __init__(self, *args, backoff: Backoff | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        # Shared by every loop of one `flask worker`: an outage met between jobs makes
        # the next job wait a little longer, so a queue is not drained into failures.
        self.backoff = backoff or Backoff()

    def request_stop(self, signum, frame):
        # RQ's own flag stays down when a stop arrives between jobs; this one is the
        # process's, whichever of its successive workers took the signal.
        _stop_asked.set()
        super().request_stop(signum, frame)

    def maintain_heartbeats(self, job, execution):
        """RQ's heartbeats while a job runs: with Redis away they are skipped (RQ would
        stop watching the job and leave its work horse running unwatched)."""
        try:
            super().maintain_heartbeats(job, execution)
        except RedisError as error:
            log.warning("job %s: heartbeat skipped: %s", job.id, describe(error))

    def set_shutdown_requested_date(self):
        # Called from the stop signal's handler: Redis being away must not turn a stop
        # into an error inside whatever the worker was doing.
        with contextlib.suppress(RedisError):
            super().set_shutdown_requested_date()

    def execute_job(self, job, queue):
        claimer = self._new_claimer(job)
        claimers.assign(claimer)  # the forked job inherits it
        try:
            super().execute_job(job, queue)
        finally:
            claimers.assign(None)
            # Only once the work horse is gone: a horse still running holds its claims.
            if claimer is not None and not self.horse_pid:
                self._hand_back(claimer, job)
        if claimer is None:
            sleep_unless(self.backoff.next(), _stop_asked.is_set)
        else:
            self.backoff.reset()

    def _new_claimer(self, job) -> int | None:
        try:
            return claimers.new_claimer_id()
        except Exception as error:
            if not is_outage(error):
                raise
            forget_session()
            log.warning("job %s runs without a claimer: %s", job.id, describe(error))
            return None

    def _hand_back(self, claimer: int, job) -> None:
        try:
            handed_back = claimers.release_held_by(claimer)
        except Exception as error:
            if not is_outage(error):
                raise
            forget_session()
            log.warning(
                "job %s: its claimed IDs are left to reconcile: %s", job.id, describe(error)
            )
            return
        if handed_back:
            log.info("job %s left %d claimed IDs; handed back", job.id, handed_back)

    def handle_warm_shutdown_request(self):
        if self.horse_pid:
            with contextlib.suppress(ProcessLookupError):  # the job has just ended
                os.kill(self.horse_pid, claimers.STOP_SIGNAL)

    def setup_work_horse_signals(self):
        super().setup_work_horse_signals()
        signal.signal(claimers.STOP_SIGNAL, claimers.request_stop)


_stop_asked = threading.Event()


def serve(make_queues: Callable[[], list[Queue]], burst: bool) -> None:
    """Run RQ's work loop until it is asked to stop (or, in burst mode, runs dry),
    starting it again, with a fresh worker, whenever a server's absence ended it."""
    backoff = Backoff()
    _stop_asked.clear()

    def work_once() -> bool:
        queues = make_queues()
        ClaimingWorker(queues, connection=queues[0].connection, backoff=backoff).work(burst=burst)
        return burst or _stop_asked.is_set()

    # A stop request between two loops (RQ's signal handler raises it when idle).
    with contextlib.suppress(StopRequested):
        keep_running(work_once, "the worker", stopping=_stop_asked.is_set, backoff=backoff)
