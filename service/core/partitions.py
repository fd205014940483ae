"""The day partitions of `assignments`: one per UTC day of the tasks' creation.

A partition is made before any task of its day is planned: the scheduler keeps
PARTITION_DAYS_AHEAD days made ahead, and planning makes its task's day when it finds it
missing (a scheduler that was away). A day goes whole once retention says so
(service/retention/): dropping a table is constant time and leaves no dead rows.

Neither change stops the service's reads and writes of `assignments`: a partition is
made as a table of its own and attached (a SHARE UPDATE EXCLUSIVE lock on the parent,
which reads and writes do not wait for), and detached CONCURRENTLY before it is dropped.
CREATE TABLE ... PARTITION OF and a plain DETACH would take ACCESS EXCLUSIVE instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import date, timedelta

from sqlalchemy import text

from service.core import locks
from service.core.extensions import db

PARENT = "assignments"
NAME = re.compile(rf"{PARENT}_(\d{{8}})")
# Days made ahead of today: a scheduler away for that long still finds today's there.
PARTITION_DAYS_AHEAD = 2
# Today's partition takes the claims' churn: vacuumed after 1 % of it changed instead of
# autovacuum's 20 %, so that its pending index sheds the entries of claimed rows soon.
STORAGE = (
    "autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 1000, "
    "autovacuum_vacuum_insert_scale_factor = 0.05, autovacuum_analyze_scale_factor = 0.02"
)
# A change of the partitions waits this long for its lock at most, then gives up: the
# next run of the scheduler tries again.
LOCK_TIMEOUT = "2s"
# The longest a drop may take: the scheduler runs it between its polls.
DROP_TIMEOUT = "30s"

PARTITIONS = text(
    "SELECT c.relname, i.inhdetachpending FROM pg_inherits AS i "
    "JOIN pg_class AS c ON c.oid = i.inhrelid "
    f"WHERE i.inhparent = '{PARENT}'::regclass"
)
LOCK_PARTITIONS = text(f"SELECT pg_advisory_xact_lock({locks.PARTITIONS}, 0)")
# Dropping runs outside a transaction (a concurrent detach must): a session lock keeps
# two droppers apart.
TAKE_DROP_LOCK = text(f"SELECT pg_try_advisory_lock({locks.PARTITIONS}, 1)")
DROP_DROP_LOCK = text(f"SELECT pg_advisory_unlock({locks.PARTITIONS}, 1)")


def not_a_partition(name: str | None, type_: str, parent_names) -> bool:
    """Alembic's `include_name`: the days' partitions are made at run time, not by
    revisions, so a comparison of the models with the schema leaves them out."""
    return not (type_ == "table" and name is not None and NAME.fullmatch(name))


def partition_name(day: date) -> str:
    return f"{PARENT}_{day:%Y%m%d}"


def _day_of(name: str) -> date | None:
    match = NAME.fullmatch(name)
    if not match:
        return None
    digits = match.group(1)
    return date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))


def partition_days(connection=None) -> dict[date, bool]:
    """Every day that has a partition, and whether a detach of it was left unfinished."""
    rows = (connection or db.session).execute(PARTITIONS).all()
    days = {_day_of(name): pending for name, pending in rows}
    days.pop(None, None)
    return days


def ensure_days(days: Iterable[date]) -> list[date]:
    """Make the partitions of `days` that are missing, in a transaction of their own;
    return the days made."""
    wanted = sorted(set(days))
    with db.engine.begin() as connection:
        connection.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
        connection.execute(LOCK_PARTITIONS)
        missing = [day for day in wanted if day not in partition_days(connection)]
        for day in missing:
            _make(connection, day)
    return missing


def ensure_day(day: date) -> None:
    """Make the day's partition unless it is there: a look at the catalogue first, so
    that planning takes no lock for a day made already."""
    if day not in partition_days():
        ensure_days([day])


def ensure_ahead(today: date) -> list[date]:
    return ensure_days(today + timedelta(days=n) for n in range(PARTITION_DAYS_AHEAD + 1))


def _make(connection, day: date) -> None:
    name = partition_name(day)
    connection.execute(
        text(
            f"CREATE TABLE {name} (LIKE {PARENT} INCLUDING DEFAULTS INCLUDING CONSTRAINTS) "
            f"WITH ({STORAGE})"
        )
    )
    connection.execute(
        text(
            f"ALTER TABLE {PARENT} ATTACH PARTITION {name} "
            f"FOR VALUES FROM ('{day.isoformat()}') TO ('{(day + timedelta(days=1)).isoformat()}')"
        )
    )


def drop_day(day: date) -> bool:
    """Detach the day's partition concurrently, then drop it; False when another
    process is dropping one. A detach that was cut short (its process died in it) is
    finished first."""
    name = partition_name(day)
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        if not connection.execute(TAKE_DROP_LOCK).scalar():
            return False
        connection.execute(text(f"SET lock_timeout = '{LOCK_TIMEOUT}'"))
        # A concurrent detach waits for the transactions using `assignments` to end.
        connection.execute(text(f"SET statement_timeout = '{DROP_TIMEOUT}'"))
        try:
            pending = partition_days(connection).get(day)
            if pending is not None:
                how = "FINALIZE" if pending else "CONCURRENTLY"
                connection.execute(text(f"ALTER TABLE {PARENT} DETACH PARTITION {name} {how}"))
            connection.execute(text(f"DROP TABLE IF EXISTS {name}"))
        finally:
            connection.execute(text("RESET lock_timeout"))
            connection.execute(text("RESET statement_timeout"))
            connection.execute(DROP_DROP_LOCK)
    return True
