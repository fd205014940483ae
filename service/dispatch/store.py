"""Dispatch's SQL, every statement in one place: claims and turns, the claimers' locks
and hand-backs, outcomes and their counters, and what reconcile reads.

Statuses are bound as parameters, never spelled in the SQL. Each function runs one
statement in the session (or in the connection it is given) and leaves the transaction
to its caller.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from sqlalchemy import text

from service.core import locks
from service.core.extensions import db
from service.core.models import FINISHED, UNPLANNED, AssignmentStatus, TaskStatus

# A group's claims as rows (task_id, position, task_day, claimed_at), from four bound
# arrays. The day names the row's partition: joined on it, each key probes its own
# partition's index (run-time pruning), not every day's kept.
CLAIM_KEYS = (
    "unnest(CAST(:tasks AS bigint[]), CAST(:positions AS int[]), CAST(:days AS date[]), "
    "CAST(:claimed AS timestamptz[])) AS k(task_id, position, task_day, claimed_at)"
)
# The row under the claim `k` names, still running under it. The group's days as a
# bound list, too: the planner then plans their partitions only (statements are never
# prepared, so each is planned, and a plan of every day kept costs more than the work).
STILL_UNDER_CLAIM = (
    "a.task_id = k.task_id AND a.position = k.position AND a.task_day = k.task_day "
    "AND a.task_day = ANY(CAST(:day_set AS date[])) "
    "AND a.status = :running AND a.claimed_at = k.claimed_at"
)
RUNNING = {"running": AssignmentStatus.RUNNING}

CLAIM = text(
    "WITH picked AS ("
    "  SELECT task_id, position, task_day FROM assignments"
    "  WHERE limit_id = :limit AND slot_start = :slot AND status = :pending"
    "    AND task_day BETWEEN :first_day AND :last_day"
    "  ORDER BY task_id, position LIMIT :size FOR UPDATE SKIP LOCKED) "
    "UPDATE assignments AS a SET status = :running, claimed_at = clock_timestamp(), "
    "  claimed_by = :claimer, claimed_until = clock_timestamp() + :life "
    "FROM picked WHERE a.task_id = picked.task_id AND a.position = picked.position "
    "  AND a.task_day = picked.task_day AND a.task_day BETWEEN :first_day AND :last_day "
    "RETURNING a.task_id, a.position, a.user_id, a.attempts, a.claimed_at, a.refusals, "
    "  a.task_day"
)
# Every slot of a limit takes its turns from the limit's one sequence (kept on its row
# of learned_rates), each claim reserving its IDs' turns after the last reserved, at its
# slot's step: the slot over its load, or over the learned rate when that is lower (at
# once, mid-slot too: the slot then runs on past its end). So the downstream never
# sees two slots of a limit at once, however late one starts or runs on. A slot's
# first turn is its start, or now less a catch-up of at most `catch_up` and two steps.
# The slot's row is locked before the limit's learned_rates row, as recording does.
RESERVE_TURNS = text(
    "WITH slot AS ("
    "  UPDATE slots SET "
    "    started_at = coalesce(started_at, clock_timestamp()), "
    "    last_claim_at = clock_timestamp(), "
    "    late = late OR (started_at IS NULL AND clock_timestamp() > slot_start + :late) "
    "  WHERE limit_id = :limit AND slot_start = :slot RETURNING load), "
    "step AS ("
    "  SELECT :pace / greatest(least(slot.load, r.learned_rpm), 1) AS seconds, "
    "    least(slot.load, r.learned_rpm) AS paced "
    "  FROM slot LEFT JOIN learned_rates AS r ON r.limit_id = :limit), "
    "turns AS ("
    "  INSERT INTO learned_rates AS r (limit_id, next_turn_at) "
    "  SELECT :limit, greatest(CAST(:slot AS timestamptz), "
    "      :now - least(:catch_up, 2 * step.seconds * interval '1 second')) "
    "    + make_interval(secs => :n * step.seconds) FROM step "
    "  ON CONFLICT (limit_id) DO UPDATE SET next_turn_at = "
    "    greatest(r.next_turn_at, CAST(:slot AS timestamptz), "
    "      :now - least(:catch_up, 2 * (SELECT seconds FROM step) * interval '1 second')) "
    "    + make_interval(secs => :n * (SELECT seconds FROM step)) "
    "  RETURNING r.next_turn_at) "
    "SELECT turns.next_turn_at, step.paced AS load FROM turns, step"
)
# Pending rows belong to unfinished tasks only: the days from the oldest such task's
# to today hold every row a claim of the limit can take.
# Read through the index on status: unfinished tasks are few, finished ones are years.
OLDEST_UNFINISHED = text(
    "SELECT min(date_created) FROM id_tasks WHERE status = ANY(:unfinished) AND limit_id = :limit"
)
UNFINISHED = [str(status) for status in TaskStatus if status not in FINISHED]
MARK_TASKS_RUNNING = text(
    "UPDATE id_tasks SET status = :running WHERE id = ANY(:ids) AND status = :scheduled"
)
STILL_CLAIMED = (
    f"SELECT a.task_id, a.position FROM assignments AS a JOIN {CLAIM_KEYS} "
    f"  ON {STILL_UNDER_CLAIM} "
    "WHERE a.claimed_by = :claimer"
)
PAUSED_AND_LOAD = text(
    "SELECT l.paused, s.load FROM limits AS l "
    "LEFT JOIN slots AS s ON s.limit_id = l.id AND s.slot_start = :s "
    "WHERE l.id = :l"
)
NEW_CLAIMER = text("SELECT nextval('claimer_ids')")
TAKE_CLAIMER_LOCK = text("SELECT pg_try_advisory_lock(:ns, :claimer)")
SHARE_SLOT_LOCK = text("SELECT pg_advisory_lock_shared(:slot)")
RUNNING_SLOTS = text(locks.HELD_BIGINT_LOCKS)
TAKE_RUNNER_LOCK = text("SELECT pg_try_advisory_lock(:ns, :limit_id)")
DROP_RUNNER_LOCK = text("SELECT pg_advisory_unlock(:ns, :limit_id)")
# Whether a session other than this one holds the slot's lock: a job of the slot is
# running already, which a helper joins.
SLOT_RUN_ELSEWHERE = text(locks.BIGINT_LOCK_HELD_ELSEWHERE)
DEPLOYMENT = text("SELECT id FROM deployment")
NEW_DEPLOYMENT = text("INSERT INTO deployment DEFAULT VALUES ON CONFLICT DO NOTHING")
# The live claimers are read inside the statement, after its snapshot: a claimer takes
# its lock before it claims, so every claim the statement sees has its lock visible.
RELEASE = (
    "WITH live AS MATERIALIZED ("
    f"  SELECT array_agg(key) AS keys FROM ({locks.HELD_TWO_KEY_LOCKS}) AS held), "
    "released AS ("
    "  UPDATE assignments AS a SET claimed_at = NULL, claimed_by = NULL, claimed_until = NULL, "
    "    status = CASE "
    "    WHEN t.status = :task_cancelled THEN :cancelled ELSE :pending END "
    "  FROM id_tasks AS t, live WHERE t.id = a.task_id AND a.status = :running AND ({which}) "
    "  RETURNING a.limit_id, a.slot_start, a.status) "
    "SELECT limit_id, slot_start, status, count(*) AS n FROM released "
    "GROUP BY limit_id, slot_start, status"
)
# Which claims a release hands back.
HELD_BY = "a.claimed_by = :claimer"
# A claim runs out at its `claimed_until`; one made before claims had one, `timeout`
# after it was made.
RAN_OUT = "coalesce(a.claimed_until, a.claimed_at + :timeout) < clock_timestamp()"
# Claims made before claimers existed (no `claimed_by`) wait for their timeout.
CLAIMER_GONE = "NOT coalesce(a.claimed_by = ANY(live.keys), a.claimed_by IS NULL)"
LOCK_TASK_STATUSES = text(
    "SELECT id, status FROM id_tasks WHERE id = ANY(:ids) ORDER BY id FOR UPDATE"
)
# An attempt is counted unless the call was refused; refusals count in a row.
WRITE_OUTCOMES = text(
    "UPDATE assignments AS a SET status = k.status, "
    "  attempts = a.attempts + CASE WHEN k.attempt THEN 1 ELSE 0 END, "
    "  refusals = CASE WHEN k.attempt THEN 0 ELSE a.refusals + 1 END, "
    "  error = k.error, claimed_at = NULL, claimed_by = NULL, claimed_until = NULL, "
    "  retry_at = k.retry_at, "
    "  finished_at = CASE WHEN k.status = :retrying THEN NULL "
    "    ELSE coalesce(k.ended_at, clock_timestamp()) END "
    "FROM unnest(CAST(:tasks AS bigint[]), CAST(:positions AS int[]), "
    "            CAST(:days AS date[]), "
    "            CAST(:claimed AS timestamptz[]), CAST(:statuses AS text[]), "
    "            CAST(:errors AS text[]), CAST(:retry_at AS timestamptz[]), "
    "            CAST(:ended_at AS timestamptz[]), CAST(:attempt AS boolean[])) "
    "  AS k(task_id, position, task_day, claimed_at, status, error, retry_at, ended_at, "
    "       attempt) "
    f"WHERE {STILL_UNDER_CLAIM} "
    "RETURNING a.task_id, a.position, a.user_id, a.attempts, a.status"
)
ADD_SLOT_OUTCOMES = text(
    "UPDATE slots SET done = done + :d, failed = failed + :f "
    "WHERE limit_id = :l AND slot_start = :s"
)
# A task's IDs are kept RETENTION_DAYS from its `finished_at` (service/retention/).
COUNT_ON_TASK = text(
    "UPDATE id_tasks SET done = done + :d, failed = failed + :f, "
    "  status = CASE WHEN status = :cancelled THEN status "
    "    WHEN done + :d + failed + :f < total THEN :running "
    "    WHEN failed + :f > 0 THEN :failed ELSE :done END, "
    "  finished_at = CASE WHEN status = :cancelled THEN finished_at "
    "    WHEN done + :d + failed + :f < total THEN NULL "
    "    ELSE coalesce(finished_at, clock_timestamp()) END "
    "WHERE id = :t"
)
# The statuses a task's counters move it to.
TASK_OUTCOMES = {
    "cancelled": TaskStatus.CANCELLED,
    "running": TaskStatus.RUNNING,
    "failed": TaskStatus.FAILED,
    "done": TaskStatus.DONE,
}
UNPLANNED_TASKS = text("SELECT id, total FROM id_tasks WHERE status = ANY(:unplanned) ORDER BY id")
SERVER_STARTED_WITHIN = text("SELECT pg_postmaster_start_time() > clock_timestamp() - :grace")
MARK_LATE = text("UPDATE slots SET late = true WHERE limit_id = :l AND slot_start = ANY(:late)")
# How many slots' worth of turns the pending IDs of a limit's slots before :slot take:
# each slot's pending IDs over its load.
SLOTS_OF_TURNS_BEFORE = text(
    "SELECT coalesce(sum(p.n::float / greatest(s.load, 1)), 0) FROM ("
    "  SELECT slot_start, count(*) AS n FROM assignments "
    "  WHERE limit_id = :limit AND status = :pending AND slot_start < :slot "
    "  GROUP BY slot_start) AS p "
    "JOIN slots AS s ON s.limit_id = :limit AND s.slot_start = p.slot_start"
)
# One index probe per slot (a loose index scan), so no counter can hide one.
SLOTS_WITH_PENDING_IDS = text(
    "WITH RECURSIVE pending(slot_start) AS ("
    "  (SELECT slot_start FROM assignments "
    "   WHERE limit_id = :limit AND status = :pending "
    "   ORDER BY slot_start LIMIT 1) "
    "  UNION ALL "
    "  SELECT (SELECT a.slot_start FROM assignments AS a "
    "          WHERE a.limit_id = :limit AND a.status = :pending "
    "            AND a.slot_start > pending.slot_start "
    "          ORDER BY a.slot_start LIMIT 1) "
    "  FROM pending WHERE pending.slot_start <= :until) "
    "SELECT slot_start FROM pending WHERE slot_start <= :until ORDER BY slot_start"
)


def claim_pending(limit_id: int, slot: datetime, claimer: int, size: int, life: timedelta):
    """Up to `size` pending rows of a limit's slot, in plan order, now running under the
    claimer; rows another claim has locked are skipped."""
    first_day, last_day = _days_with_pending(limit_id)
    params = {"limit": limit_id, "slot": slot, "size": size, "claimer": claimer, "life": life}
    days = {"first_day": first_day, "last_day": last_day}
    return db.session.execute(
        CLAIM, {**params, **days, "pending": AssignmentStatus.PENDING, **RUNNING}
    ).all()


def _days_with_pending(limit_id: int) -> tuple[date, date]:
    """The days whose partitions may hold the limit's pending rows: a literal range, so
    that the claim is planned for those partitions only. Tomorrow is in it for a clock
    of this machine behind the database's."""
    oldest = db.session.scalar(OLDEST_UNFINISHED, {"limit": limit_id, "unfinished": UNFINISHED})
    today = datetime.now(UTC).date()
    first = oldest.astimezone(UTC).date() if oldest is not None else today
    return min(first, today), today + timedelta(days=1)


def reserve_turns(limit_id: int, slot: datetime, claimed: int, **timing):
    """Move the limit's next turn on by `claimed` steps of the slot; returns
    (next_turn_at, the number of IDs a slot's length is paced for). `timing` holds
    `late`, `now`, `catch_up` and `pace` (the seconds a slot paces its load over) (see
    RESERVE_TURNS)."""
    return db.session.execute(
        RESERVE_TURNS, {"n": claimed, "limit": limit_id, "slot": slot, **timing}
    ).one()


def mark_tasks_running(task_ids: set[int]) -> None:
    db.session.execute(
        MARK_TASKS_RUNNING,
        {"ids": sorted(task_ids), "running": TaskStatus.RUNNING, "scheduled": TaskStatus.SCHEDULED},
    )


def still_claimed(executor, keys: dict[str, list], claimer: int, lock: bool) -> set[tuple]:
    """(task_id, position) of the rows of `keys` still under their claims by `claimer`,
    read through `executor` (a session or a connection); with `lock`, locked in one
    order until its transaction ends."""
    query = STILL_CLAIMED
    if lock:
        query += " ORDER BY a.task_id, a.position FOR UPDATE OF a"
    rows = executor.execute(text(query), {**keys, "claimer": claimer, **RUNNING}).all()
    return {tuple(row) for row in rows}


def paused_and_load(limit_id: int, slot: datetime):
    """(paused, load) of a limit and its slot; None once the limit is gone."""
    return db.session.execute(PAUSED_AND_LOAD, {"l": limit_id, "s": slot}).one_or_none()


def new_claimer_id() -> int:
    return db.session.execute(NEW_CLAIMER).scalar()


def take_claimer_locks(holder, claimer: int, slot_key: int) -> bool:
    """On `holder`, a connection of the claimer's own: its lock, then a shared lock on
    its slot; False (and nothing taken) while another session holds the claimer's."""
    taken = holder.execute(TAKE_CLAIMER_LOCK, {"ns": locks.CLAIMER, "claimer": claimer}).scalar()
    if taken:
        holder.execute(SHARE_SLOT_LOCK, {"slot": slot_key})
    return taken


def take_runner_lock(holder, limit_id: int) -> bool:
    return holder.execute(
        TAKE_RUNNER_LOCK, {"ns": locks.LIMIT_RUNNER, "limit_id": limit_id}
    ).scalar()


def drop_runner_lock(holder, limit_id: int) -> None:
    holder.execute(DROP_RUNNER_LOCK, {"ns": locks.LIMIT_RUNNER, "limit_id": limit_id})


def slot_run_elsewhere(holder, slot_key: int) -> bool:
    return holder.execute(SLOT_RUN_ELSEWHERE, {"slot": slot_key}).scalar()


def running_slot_keys() -> set[int]:
    rows = db.session.execute(RUNNING_SLOTS, {"ns": locks.SLOT})
    return {row.key for row in rows}


def deployment_id():
    """The deployment's id, made again should the database have lost its row."""
    found = db.session.execute(DEPLOYMENT).scalar()
    if found is None:
        db.session.execute(NEW_DEPLOYMENT)
        found = db.session.execute(DEPLOYMENT).scalar()
    return found


def release(which: str, **params) -> list:
    """Claimed rows chosen by `which` (HELD_BY, RAN_OUT, CLAIMER_GONE) back to pending,
    or to cancelled if their task was; returns (limit_id, slot_start, status, n) rows."""
    return db.session.execute(
        text(RELEASE.format(which=which)),
        {
            "ns": locks.CLAIMER,
            "task_cancelled": TaskStatus.CANCELLED,
            "cancelled": AssignmentStatus.CANCELLED,
            "pending": AssignmentStatus.PENDING,
            **RUNNING,
            **params,
        },
    ).all()


def lock_task_statuses(task_ids: list[int]) -> dict[int, str]:
    """Task rows first, in id order, as every writer of several tasks takes them."""
    return dict(db.session.execute(LOCK_TASK_STATUSES, {"ids": task_ids}).all())


def write_outcomes(keys: dict[str, list], verdicts: list[tuple], ended_at: list) -> list:
    """One statement for a whole group: each row still under its claim gets its verdict
    (status, error, retry at, whether it used an attempt) and, when known, when its
    call ended; returns the rows written."""
    return db.session.execute(
        WRITE_OUTCOMES,
        {
            **keys,
            "statuses": [status for status, _, _, _ in verdicts],
            "errors": [error for _, error, _, _ in verdicts],
            "retry_at": [retry_at for _, _, retry_at, _ in verdicts],
            "attempt": [attempt for _, _, _, attempt in verdicts],
            "ended_at": ended_at,
            "retrying": AssignmentStatus.RETRYING,
            **RUNNING,
        },
    ).all()


def add_slot_outcomes(limit_id: int, slot: datetime, done: int, failed: int) -> None:
    db.session.execute(ADD_SLOT_OUTCOMES, {"d": done, "f": failed, "l": limit_id, "s": slot})


def count_on_task(task_id: int, done: int, failed: int) -> None:
    """Add outcomes to a task; one whose IDs have all finished becomes done, or failed
    if any failed."""
    db.session.execute(COUNT_ON_TASK, {"d": done, "f": failed, "t": task_id, **TASK_OUTCOMES})


def unplanned_tasks() -> list:
    """(id, total) of the tasks still received or planning."""
    return db.session.execute(UNPLANNED_TASKS, {"unplanned": list(UNPLANNED)}).all()


def server_started_within(grace: timedelta) -> bool:
    return db.session.execute(SERVER_STARTED_WITHIN, {"grace": grace}).scalar()


def mark_late(limit_id: int, slots: list[datetime]) -> None:
    db.session.execute(MARK_LATE, {"l": limit_id, "late": slots})


def slots_of_turns_before(limit_id: int, slot: datetime) -> float:
    params = {"limit": limit_id, "slot": slot, "pending": AssignmentStatus.PENDING}
    return db.session.execute(SLOTS_OF_TURNS_BEFORE, params).scalar()


def slots_with_pending_ids(limit_id: int, until: datetime) -> list[datetime]:
    """Each slot of a limit up to `until` holding pending IDs, found from the pending
    rows themselves."""
    return list(
        db.session.execute(
            SLOTS_WITH_PENDING_IDS,
            {"limit": limit_id, "until": until, "pending": AssignmentStatus.PENDING},
        ).scalars()
    )
