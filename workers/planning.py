"""Planning jobs: turn a received task into slot assignments."""

from __future__ import annotations

from service.planning import plan_stored_task

from .context import job_context


def plan_task(task_id: int) -> str:
    """Plan every ID of a task into a slot; re-running it finishes an interrupted plan."""
    with job_context():
        return plan_stored_task(task_id)
