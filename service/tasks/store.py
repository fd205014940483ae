"""The task store: a task and its IDs, stored as arrays of IDS_PER_CHUNK by one COPY
(de-duplicated by PostgreSQL, so memory stays flat), read back page by page or
streamed, and released from the plan. psycopg's own placeholders only on COPY's
cursor; every other statement is SQLAlchemy's."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from itertools import islice

from flask import current_app
from psycopg import sql
from sqlalchemy import func, select, text
from sqlalchemy.orm import defer

from service.core.errors import Refused, TooLarge, not_found
from service.core.extensions import db, raw_connection
from service.core.models import (
    Assignment,
    AssignmentStatus,
    IdTask,
    TaskIdChunk,
    TaskStatus,
)
from service.core.paging import newest_first
from service.limits.store import subtract_loads

IDS_PER_CHUNK = 10_000
ID_CHUNKS = "task_id_chunks"
# New IDs for a task, de-duplicated there before they are compared with its own or take
# their place; it holds one set of IDs, under any task id.
STAGED_CHUNKS = "staged_id_chunks"
STAGED_TASK = 0
# Tasks up to this many IDs echo them in `payload`, as the original API did;
# larger ones are read page by page from /ids/ so that lists stay small.
PAYLOAD_ECHO_MAX_IDS = 1000


def list_tasks(offset: int, limit: int) -> tuple[list[IdTask], int]:
    """A page of tasks, newest first, without their payloads (lists do not show them)."""
    return newest_first(IdTask, offset, limit, defer(IdTask.payload))


def get_task(task_id: int, *, lock: bool = False) -> IdTask:
    query = select(IdTask).where(IdTask.id == task_id)
    if lock:
        # Refresh from the locked row: the session may hold a copy read before the lock.
        query = query.with_for_update(of=IdTask).execution_options(populate_existing=True)
    task = db.session.scalar(query)
    if task is None:
        raise not_found("task", task_id)
    return task


@dataclass(frozen=True)
class StagedIds:
    """IDs in a temporary table shaped like task_id_chunks, gone with the transaction."""

    table: str
    submitted: int
    distinct: int


def stage_ids(ids: Iterable[int], table: str = STAGED_CHUNKS, limited: bool = True) -> StagedIds:
    """COPY the IDs, de-duplicated, into a new temporary table `table`. Unless `limited`,
    more than MAX_IDS_PER_TASK are staged too (replace_ids refuses them)."""
    with raw_connection().cursor() as cur:
        cur.execute(
            sql.SQL("CREATE TEMP TABLE {} (LIKE task_id_chunks) ON COMMIT DROP").format(
                sql.Identifier(table)
            )
        )
        counts = store_distinct_ids(cur, table, STAGED_TASK, ids, limited)
    return StagedIds(table, *counts)


def same_ids(task: IdTask, staged: StagedIds) -> bool:
    """Whether the staged IDs are the task's own: the same distinct IDs in the same order.

    Both are cut into chunks of IDS_PER_CHUNK the same way, so that as many IDs with the
    same chunks are the same IDs; PostgreSQL compares them, holding none in memory here.
    """
    if staged.distinct != task.total:
        return False
    return not db.session.execute(
        text(
            f"SELECT EXISTS (SELECT chunk_no, ids FROM {staged.table} EXCEPT "
            "SELECT chunk_no, ids FROM task_id_chunks WHERE task_id = :task)"
        ),
        {"task": task.id},
    ).scalar()


def replace_ids(task: IdTask, staged: StagedIds) -> None:
    """The task's IDs, all new: the staged ones."""
    limit = current_app.config["MAX_IDS_PER_TASK"]
    if staged.submitted > limit:
        raise _too_many(limit)
    db.session.execute(TaskIdChunk.__table__.delete().where(TaskIdChunk.task_id == task.id))
    db.session.execute(
        text(
            "INSERT INTO task_id_chunks (task_id, chunk_no, ids) "
            f"SELECT :task, chunk_no, ids FROM {staged.table}"
        ),
        {"task": task.id},
    )
    _count_ids(task, staged.submitted, staged.distinct)


def handed_out(task_id: int) -> bool:
    """Whether any of the task's IDs is still in a slot, or has run."""
    return db.session.execute(
        text("SELECT EXISTS (SELECT 1 FROM assignments WHERE task_id = :t)"), {"t": task_id}
    ).scalar()


def planned_ids(task, offset, limit, status, slot):
    # The task's day names its partition: one index is read, not every day's.
    filters = [Assignment.task_id == task.id, Assignment.task_day == task.day]
    if status:
        filters.append(Assignment.status == status)
    if slot:
        filters.append(Assignment.slot_start == slot)
    rows = db.session.scalars(
        select(Assignment).where(*filters).order_by(Assignment.position).offset(offset).limit(limit)
    ).all()
    items = [
        {
            "position": row.position,
            "user_id": row.user_id,
            "slot": row.slot_start,
            "status": row.status,
            "attempts": row.attempts,
            "error": row.error,
            "finished_at": row.finished_at,
        }
        for row in rows
    ]
    if len(filters) == 2:
        return items, task.total
    return items, db.session.scalar(select(func.count()).select_from(Assignment).where(*filters))


def received_ids(task, offset, limit, status, slot):
    """Before planning the IDs exist only in the task's chunks."""
    unplanned = "cancelled" if task.status == TaskStatus.CANCELLED else "received"
    if slot or (status and status != unplanned):
        return [], 0
    first_chunk, last_chunk = offset // IDS_PER_CHUNK, (offset + limit - 1) // IDS_PER_CHUNK
    rows = db.session.execute(
        text(
            "SELECT c.chunk_no * :per_chunk + u.ordinal - 1 AS position, u.user_id "
            "FROM task_id_chunks c, unnest(c.ids) WITH ORDINALITY AS u(user_id, ordinal) "
            "WHERE c.task_id = :task AND c.chunk_no BETWEEN :first AND :last "
            "ORDER BY position OFFSET :skip LIMIT :limit"
        ),
        {
            "per_chunk": IDS_PER_CHUNK,
            "task": task.id,
            "first": first_chunk,
            "last": last_chunk,
            "skip": offset - first_chunk * IDS_PER_CHUNK,
            "limit": limit,
        },
    )
    items = [
        {
            "position": position,
            "user_id": user_id,
            "slot": None,
            "status": unplanned,
            "attempts": 0,
            "error": None,
            "finished_at": None,
        }
        for position, user_id in rows
    ]
    return items, task.total


def release_pending(task: IdTask, new_status: str | None) -> set[datetime]:
    """Take the task's pending IDs out of their slots' load; mark or delete them; return
    the slots they left.

    Retrying IDs hold no slot's capacity yet: they are only marked.
    """
    if not task.planned:
        return set()
    if new_status is None:
        change = "DELETE FROM assignments WHERE task_id = :task AND status = :pending"
    else:
        change = (
            "UPDATE assignments SET status = :new_status "
            "WHERE task_id = :task AND status = :pending"
        )
        cancel_retrying(task.id)
    released = db.session.execute(
        text(
            f"WITH released AS ({change} RETURNING limit_id, slot_start) "
            "SELECT limit_id, slot_start, count(*) FROM released GROUP BY limit_id, slot_start"
        ),
        {"task": task.id, "new_status": new_status, "pending": AssignmentStatus.PENDING},
    ).all()
    subtract_loads({(limit_id, slot): n for limit_id, slot, n in released})
    return {slot for _, slot, _ in released}


def cancel_retrying(task_id: int) -> None:
    """A cancelled task's retrying IDs are cancelled too: they hold no slot yet."""
    db.session.execute(
        text(
            "UPDATE assignments SET status = :cancelled, retry_at = NULL "
            "WHERE task_id = :task AND status = :retrying"
        ),
        {
            "task": task_id,
            "cancelled": AssignmentStatus.CANCELLED,
            "retrying": AssignmentStatus.RETRYING,
        },
    )


def batches(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def store_ids(task: IdTask, ids: Iterable[int]) -> None:
    """Store the task's distinct IDs; count them and the repeats dropped."""
    with raw_connection().cursor() as cur:
        submitted, distinct = store_distinct_ids(cur, ID_CHUNKS, task.id, ids)
    _count_ids(task, submitted, distinct)


def _count_ids(task: IdTask, submitted: int, distinct: int) -> None:
    """The task's counts of its stored IDs, and the IDs themselves when few enough."""
    payload = None
    if distinct <= PAYLOAD_ECHO_MAX_IDS:
        payload = db.session.execute(
            text(
                "SELECT array_to_string(ids, ',') FROM task_id_chunks "
                "WHERE task_id = :task AND chunk_no = 0"
            ),
            {"task": task.id},
        ).scalar()
    task.total = distinct
    task.duplicates = submitted - distinct
    task.payload = payload


def store_distinct_ids(
    cur, table: str, task_id: int, ids: Iterable[int], limited: bool = True
) -> tuple[int, int]:
    """COPY the IDs into `table` (shaped as task_id_chunks) as arrays of IDS_PER_CHUNK,
    then drop repeats if there are any; return how many were submitted and distinct.
    More than MAX_IDS_PER_TASK are refused as they come, unless not `limited`.

    PostgreSQL does the de-duplication, so memory stays flat however many IDs come.
    """
    limit = current_app.config["MAX_IDS_PER_TASK"] if limited else None
    chunks = sql.Identifier(table)
    submitted = 0
    with cur.copy(sql.SQL("COPY {} (task_id, chunk_no, ids) FROM STDIN").format(chunks)) as copy:
        for chunk_no, chunk in enumerate(batches(ids, IDS_PER_CHUNK)):
            submitted += len(chunk)
            if limit is not None and submitted > limit:
                raise _too_many(limit)
            copy.write_row((task_id, chunk_no, "{" + ",".join(map(str, chunk)) + "}"))
    if not submitted:
        raise Refused("no IDs given: the body holds none")
    cur.execute(
        sql.SQL(
            "SELECT count(DISTINCT u) FROM {} c, unnest(c.ids) AS u WHERE c.task_id = %s"
        ).format(chunks),
        (task_id,),
    )
    distinct = cur.fetchone()[0]
    if distinct < submitted:
        _rewrite_without_repeats(cur, chunks, task_id)
    return submitted, distinct


def _too_many(limit: int) -> TooLarge:
    return TooLarge(f"a task takes at most {limit} IDs (MAX_IDS_PER_TASK)")


def _rewrite_without_repeats(cur, chunks: sql.Identifier, task_id: int) -> None:
    """Keep the first occurrence of each ID, renumbered densely in submission order."""
    params = {"task": task_id, "per_chunk": IDS_PER_CHUNK}
    cur.execute(
        sql.SQL(
            "CREATE TEMP TABLE first_seen ON COMMIT DROP AS "
            "SELECT u.user_id, min(c.chunk_no::bigint * %(per_chunk)s + u.ordinal) AS first "
            "FROM {} c, unnest(c.ids) WITH ORDINALITY AS u(user_id, ordinal) "
            "WHERE c.task_id = %(task)s GROUP BY u.user_id"
        ).format(chunks),
        params,
    )
    cur.execute(sql.SQL("DELETE FROM {} WHERE task_id = %(task)s").format(chunks), params)
    cur.execute(
        sql.SQL(
            "INSERT INTO {} (task_id, chunk_no, ids) "
            "SELECT %(task)s, rank / %(per_chunk)s, array_agg(user_id ORDER BY rank) "
            "FROM (SELECT user_id, row_number() OVER (ORDER BY first) - 1 AS rank "
            "      FROM first_seen) AS ranked "
            "GROUP BY rank / %(per_chunk)s"
        ).format(chunks),
        params,
    )


def read_ids(connection, table: str, task_id: int) -> Iterator[tuple[int, int]]:
    """(position, user_id) of a task's stored IDs in submission order, read through
    `connection` (SQLAlchemy's) with a server-side cursor, a few chunks in memory at a
    time. `table` is ID_CHUNKS, or a temporary table shaped like it."""
    rows = connection.execution_options(yield_per=2).execute(
        text(f"SELECT chunk_no, ids FROM {table} WHERE task_id = :task ORDER BY chunk_no"),
        {"task": task_id},
    )
    for chunk_no, ids in rows:
        yield from enumerate(ids, start=chunk_no * IDS_PER_CHUNK)
