"""Planning a stored task into slots (the PostgreSQL side of the planner)."""

from __future__ import annotations


def plan_stored_task(task_id: int) -> str:
    return f"task {task_id}: planning not implemented yet"
