"""Planning jobs: turn a received task into slot assignments; plan retries."""

from __future__ import annotations

from service.planning import retries, windows
from workers.context import job_context


def plan_task(task_id: int) -> windows.PlanOutcome:
    """Plan every ID of a task into a slot; re-running it finishes an interrupted plan."""
    with job_context():
        return windows.plan_stored_task(task_id)


def plan_retries() -> int:
    """Plan the retrying IDs of every task into later slots; returns how many."""
    with job_context():
        return retries.plan_retries()
