"""ID tasks: submission, replacement, renaming and cancellation; reading a task's IDs.

Each change is one transaction; the planning it needs is queued once it has committed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime

from sqlalchemy import func

from service.core.errors import Conflict, Gone
from service.core.extensions import db
from service.core.models import FINISHED, AssignmentStatus, IdTask, Overflow, TaskStatus
from service.jobs import drop_idle_slot_jobs, enqueue_planning
from service.limits import store as limits
from service.tasks import store

# The statuses in which no ID has been handed to a worker yet.
REPLANNABLE = (TaskStatus.RECEIVED, TaskStatus.PLANNING, TaskStatus.SCHEDULED, TaskStatus.REFUSED)
# The fields besides the IDs that decide a task's plan: a change re-plans it.
PLAN_RULES = ("limit", "overflow", "not_before")
# A check of a task about to be planned, run before its transaction commits; it raises a
# DomainError to refuse it (the planning layer's horizon: service/planning/horizon.py).
Admission = Callable[[IdTask], None]


def _admit_any(task: IdTask) -> None:
    """No check: every task is planned."""


def submit_task(
    task_name: str,
    ids: Iterable[int],
    overflow: str | None = None,
    not_before: datetime | None = None,
    limit: str | None = None,
    admit: Admission = _admit_any,
) -> IdTask:
    """Store a task and its distinct IDs in one transaction, then queue its planning.

    The task names its limit (`default` when none; 422 when there is no such limit), and
    `admit` may refuse it once its IDs are counted, before anything is committed.
    """
    task = IdTask(
        task_name=task_name,
        limit=limits.named_by_request(limit, limits.KEY_SHARE),
        overflow=overflow or Overflow.SPREAD,
        not_before=not_before,
        status=TaskStatus.RECEIVED,
    )
    db.session.add(task)
    db.session.flush()
    store.store_ids(task, ids)
    admit(task)
    db.session.commit()
    enqueue_planning(task.id, task.total)
    return task


def replace_task(task_id: int, fields: dict, admit: Admission = _admit_any) -> IdTask:
    """PUT: every field given or set to its default; the same IDs keep their plan."""
    defaults = {"limit": limits.DEFAULT, "overflow": Overflow.SPREAD, "not_before": None}
    return update_task(task_id, {**defaults, **fields}, admit)


def update_task(task_id: int, changes: dict, admit: Admission = _admit_any) -> IdTask:
    """Rename at any time; new IDs, overflow or start only while none has run, and re-plan
    (once `admit` lets the task so changed be planned).

    IDs equal to the task's own (the same distinct IDs in the same order) are no change.
    """
    task = store.get_task(task_id, lock=True)
    if "limit" in changes:
        changes = {**changes, "limit": limits.named_by_request(changes["limit"], limits.KEY_SHARE)}
    if "task_name" in changes:
        task.task_name = changes["task_name"]
    if "ids" in changes:
        # Staged in PostgreSQL, which compares them with the task's own: a million IDs
        # stay out of memory here. Too many are refused only when they are to replace
        # the task's, so that a task that has run refuses new IDs as it always did.
        changes = {**changes, "ids": store.stage_ids(changes["ids"], limited=False)}
        if store.same_ids(task, changes["ids"]):
            task.duplicates = changes["ids"].submitted - task.total
            changes = {name: value for name, value in changes.items() if name != "ids"}
    new_rules = {
        name: changes[name]
        for name in PLAN_RULES
        if name in changes and changes[name] != getattr(task, name)
    }
    replan = "ids" in changes or bool(new_rules)
    if replan and task.ids_removed_at is not None:
        # Its day's partition is gone for good: retention never gives a day back.
        raise Conflict(
            f"task {task.id}'s IDs were removed on {task.ids_removed_at.isoformat()} "
            "(RETENTION_DAYS): it cannot be planned again; submit a new task"
        )
    # A finished task may have lost its limit: the name is then None.
    old_limit, left = (task.limit_id, task.limit_name), set()
    if replan:
        left = _release_plan(task)
        for name, value in new_rules.items():
            setattr(task, name, value)
        if "ids" in changes:
            store.replace_ids(task, changes["ids"])
        task.status, task.error, task.finished_at = TaskStatus.RECEIVED, None, None
        admit(task)
    db.session.commit()
    if replan:
        drop_idle_slot_jobs(*old_limit, left)
        enqueue_planning(task.id, task.total)
    return task


def cancel_task(task_id: int) -> None:
    """Cancel a task: its pending IDs leave the plan and their capacity is freed."""
    task = store.get_task(task_id, lock=True)
    if task.status == TaskStatus.CANCELLED:
        return
    if task.status in FINISHED and task.status != TaskStatus.REFUSED:
        raise Conflict(f"task {task_id} has already finished ({task.status})")
    left = store.release_pending(task, AssignmentStatus.CANCELLED)
    task.status, task.error, task.finished_at = TaskStatus.CANCELLED, None, func.now()
    db.session.commit()
    drop_idle_slot_jobs(task.limit_id, task.limit_name, left)


def list_task_ids(
    task_id: int, offset: int, limit: int, status: str | None = None, slot: datetime | None = None
) -> tuple[list[dict], int]:
    """A page of the task's IDs in submission order, with slot and outcome."""
    task = store.get_task(task_id)
    if task.ids_removed_at is not None:
        raise Gone(
            f"the IDs of task {task_id} were removed on {task.ids_removed_at.isoformat()}, "
            "RETENTION_DAYS after it finished; the task keeps its counts and first and "
            "last slot"
        )
    if task.planned:
        return store.planned_ids(task, offset, limit, status, slot)
    return store.received_ids(task, offset, limit, status, slot)


def _release_plan(task: IdTask) -> set[datetime]:
    """Drop the task's plan, refusing (409) once any of its IDs has been handed out;
    return the slots it held.

    A slot job's claim does not wait for the task's row lock; deleting the pending rows
    waits for any claim in flight instead, so the check after it sees every claim.
    """
    started = Conflict(
        f"task {task.id} is {task.status}: its IDs can change only before any has run"
    )
    if task.status not in REPLANNABLE:
        raise started
    left = store.release_pending(task, None)
    if store.handed_out(task.id):
        raise started
    task.planned = task.done = task.failed = 0
    task.first_slot = task.last_slot = None
    return left
