"""Planning jobs: turn a received task into slot assignments; plan retries."""

from __future__ import annotations

from service.planning import replan, retries, windows
from workers.context import job_context


def plan_task(task_id: int) -> windows.PlanOutcome:
    """Plan every ID of a task into a slot; re-running it finishes an interrupted plan."""
    with job_context():
        return windows.plan_stored_task(task_id)


def plan_retries() -> int:
    """Plan the retrying IDs of every task into later slots; returns how many."""
    with job_context():
        return retries.plan_retries()


def replan_limit(limit_id: int, event_id: int) -> replan.Replan:
    """Plan a limit's IDs in slots not yet started again at its learned rate."""
    with job_context():
        return replan.replan_limit(limit_id, event_id)
