"""Slot jobs: one per slot, started by rq-scheduler just before the slot begins."""

from __future__ import annotations

from datetime import datetime

from service import dispatch

from .context import job_context


def run_slot(slot_start: str) -> dispatch.SlotRun:
    """Process the slot's pending IDs, paced through it; `slot_start` is ISO 8601."""
    with job_context():
        return dispatch.run_slot(datetime.fromisoformat(slot_start))
