"""The RQ worker that `flask worker` runs: RQ's forking worker, plus claimers.

Before it forks a job it gives the job a claimer (service/claimers.py); after the job,
however it ended (finished, crashed, killed by a cold shutdown), it hands back whatever
that claimer still holds, so no ID waits for a timeout because its worker stopped. On a
warm shutdown (the first Ctrl-C or SIGTERM) it asks the running slot job to stop after
the IDs it is processing, rather than waiting for the rest of the slot.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal

from rq import Worker

from . import claimers

log = logging.getLogger(__name__)


class ClaimingWorker(Worker):
    def execute_job(self, job, queue):
        claimer = claimers.new_claimer_id()
        claimers.assign(claimer)  # the forked job inherits it
        try:
            super().execute_job(job, queue)
        finally:
            claimers.assign(None)
            handed_back = claimers.release_held_by(claimer)
            if handed_back:
                log.info("job %s left %d claimed IDs; handed back", job.id, handed_back)

    def handle_warm_shutdown_request(self):
        if self.horse_pid:
            with contextlib.suppress(ProcessLookupError):  # the job has just ended
                os.kill(self.horse_pid, claimers.STOP_SIGNAL)

    def setup_work_horse_signals(self):
        super().setup_work_horse_signals()
        signal.signal(claimers.STOP_SIGNAL, claimers.request_stop)
