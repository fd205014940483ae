"""Slot jobs: one per slot, started by rq-scheduler just before the slot begins."""

from __future__ import annotations

from datetime import datetime

from service.dispatch import slot_runs as dispatch
from service.limits.store import DEFAULT
from workers.context import job_context


def run_slot(slot_start: str, limit: str = DEFAULT) -> dispatch.SlotRun:
    """Process the pending IDs of a limit's slot, paced through it; `slot_start` is
    ISO 8601. Jobs queued before limits existed name no limit: theirs is the default."""
    with job_context():
        return dispatch.run_slot(limit, datetime.fromisoformat(slot_start))
