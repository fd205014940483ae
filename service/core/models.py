"""Tables of the service. The schema itself comes only from migrations/."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from enum import StrEnum

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import Mapped, mapped_column, relationship

from service.core.extensions import db

# The largest user ID: IDs are stored as BIGINT.
MAX_ID = 2**63 - 1
# Refusals of one ID in a row that fail it, unless its limit says otherwise.
DEFAULT_MAX_REFUSALS = 30


class TaskStatus(StrEnum):
    RECEIVED = "received"
    PLANNING = "planning"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # Not planned: its plan would have gone past the horizon (its `error` says how far).
    REFUSED = "refused"


FINISHED = (TaskStatus.DONE, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.REFUSED)
# Not planned yet: planning may (still) run for these.
UNPLANNED = (TaskStatus.RECEIVED, TaskStatus.PLANNING)


class Overflow(StrEnum):
    SPREAD = "spread"
    DEFER = "defer"


def _in(column: str, values) -> str:
    return f"{column} IN ({', '.join(repr(str(v)) for v in values)})"


class User(db.Model):
    __tablename__ = "users"
    __table_args__ = (Index("ix_users_newest", "date_created", "id"),)

    # Given by a task, a client, or the next above the largest (users/store.py).
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    name: Mapped[str | None] = mapped_column(String(255))
    date_created: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    last_processed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    times_processed: Mapped[int] = mapped_column(Integer, server_default="0", default=0)


class Limit(db.Model):
    """A named downstream: its own RPM, processor and options, slots and slot jobs.

    `id` is the small key that slots, assignments, locks and joins use; `name` is the
    public one.
    """

    __tablename__ = "limits"
    __table_args__ = (
        UniqueConstraint("name"),
        CheckConstraint("rpm >= 1", name="rpm"),
        CheckConstraint("max_refusals >= 1", name="max_refusals"),
    )

    id: Mapped[int] = mapped_column(Integer, Identity(start=1), primary_key=True)
    name: Mapped[str] = mapped_column(String(63))
    rpm: Mapped[int] = mapped_column(Integer)
    processor: Mapped[str] = mapped_column(String(255))
    options: Mapped[dict] = mapped_column(JSONB, server_default=text("'{}'::jsonb"), default=dict)
    paused: Mapped[bool] = mapped_column(Boolean, server_default=text("false"), default=False)
    # When a process found its destination outside what the deployment allows (see
    # service/limits/held.py); null again once one finds it allowed.
    held_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The downstream's refusals lower the learned rate (service/limits/learning.py).
    adaptive: Mapped[bool] = mapped_column(Boolean, server_default=text("true"), default=True)
    # Refusals of one ID in a row that fail it for good.
    max_refusals: Mapped[int] = mapped_column(
        Integer, server_default=str(DEFAULT_MAX_REFUSALS), default=DEFAULT_MAX_REFUSALS
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class LearnedRate(db.Model):
    """What a limit's downstream has taught it by refusing calls (service/limits/
    learning.py), and the limit's sequence of turns. A table apart from `limits`, so
    that recording a refusal, or a claim, never waits for the share lock a planner
    holds on the limit's row."""

    __tablename__ = "learned_rates"
    __table_args__ = (
        CheckConstraint("learned_rpm IS NULL OR learned_rpm >= 1", name="learned_rpm"),
    )

    limit_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("limits.id", ondelete="CASCADE"), primary_key=True
    )
    # The slot capacity the downstream has shown it takes; null while that is `rpm`.
    learned_rpm: Mapped[int | None] = mapped_column(Integer)
    # The slot whose refusals last lowered it: it is lowered at most once per slot.
    learned_slot: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Its last change: it rises again after a quiet period from then.
    learned_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    refusals: Mapped[int] = mapped_column(BigInteger, server_default="0", default=0)
    last_refusal_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_refusal_status: Mapped[int | None] = mapped_column(SmallInteger)
    last_refusal_retry_after: Mapped[float | None] = mapped_column(Float)
    last_refusal_reason: Mapped[str | None] = mapped_column(Text)
    # The newest re-plan: an older one still under way stops for it.
    replan_event_id: Mapped[int | None] = mapped_column(BigInteger)
    # Every slot of the limit takes its turns from this one sequence, so that two slots
    # never run at once (one running past its end, or late).
    next_turn_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class IdTask(db.Model):
    __tablename__ = "id_tasks"
    __table_args__ = (
        CheckConstraint(_in("status", TaskStatus), name="status"),
        CheckConstraint(_in("overflow", Overflow), name="overflow"),
        Index("ix_id_tasks_newest", "date_created", "id"),
        Index("ix_id_tasks_status", "status"),
        Index("ix_id_tasks_limit_id", "limit_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(start=1), primary_key=True)
    task_name: Mapped[str] = mapped_column(String(255))
    # Null once its limit was deleted (a limit goes only when none of its IDs waits).
    limit_id: Mapped[int | None] = mapped_column(
        Integer, ForeignKey("limits.id", ondelete="SET NULL")
    )
    limit: Mapped[Limit | None] = relationship(lazy="joined")

    overflow: Mapped[str] = mapped_column(String(8), default=Overflow.SPREAD)
    status: Mapped[str] = mapped_column(String(16), default=TaskStatus.RECEIVED)
    # The submitted IDs as the original API echoed them; kept only for small tasks.
    payload: Mapped[str | None] = mapped_column(Text)
    total: Mapped[int] = mapped_column(Integer, default=0)
    duplicates: Mapped[int] = mapped_column(Integer, default=0)
    planned: Mapped[int] = mapped_column(Integer, default=0)
    done: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    # Planning starts at the window holding this moment, never in a slot before it.
    not_before: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    first_slot: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_slot: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Why a refused task was not planned.
    error: Mapped[str | None] = mapped_column(Text)
    # When it reached a finished status: its IDs are kept RETENTION_DAYS from then.
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When its day's IDs were dropped (service/retention/): its `/ids/` are gone.
    ids_removed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    date_created: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    date_updated: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )

    @property
    def task_status(self) -> bool:
        return self.status in FINISHED

    @property
    def pending(self) -> int:
        if self.status in (TaskStatus.CANCELLED, TaskStatus.REFUSED):
            return 0
        return self.total - self.done - self.failed

    @property
    def limit_name(self) -> str | None:
        return self.limit.name if self.limit else None

    @property
    def day(self) -> date:
        """The UTC day it was created: its IDs' partition of `assignments`."""
        return self.date_created.astimezone(UTC).date()


class AssignmentStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # Failed, to be tried again: waiting for its retry to be planned into a slot.
    RETRYING = "retrying"


class TaskIdChunk(db.Model):
    """The distinct IDs of a task, in submission order, stored as arrays of IDS_PER_CHUNK.

    A million IDs are a hundred rows: written with one COPY and read back in a fraction
    of a second, which a row per ID would take several seconds to do.
    """

    __tablename__ = "task_id_chunks"

    task_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("id_tasks.id", ondelete="CASCADE"), primary_key=True
    )
    chunk_no: Mapped[int] = mapped_column(Integer, primary_key=True)
    ids: Mapped[list[int]] = mapped_column(ARRAY(BigInteger))


class Slot(db.Model):
    """One slot of a limit's plan; `load` counts its IDs that are not cancelled."""

    __tablename__ = "slots"

    limit_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("limits.id", ondelete="CASCADE"), primary_key=True
    )
    slot_start: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    load: Mapped[int] = mapped_column(Integer, server_default="0")
    done: Mapped[int] = mapped_column(Integer, server_default="0")
    failed: Mapped[int] = mapped_column(Integer, server_default="0")
    # The turn after the last one handed to a worker: pacing goes on from there.
    next_turn_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_claim_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    late: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    # It took IDs from a re-plan (service/planning/replan.py).
    replanned: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))


class Assignment(db.Model):
    """One ID of a task planned into a slot, with its outcome.

    No foreign key to id_tasks: rows arrive by the million through COPY, where a key
    check per row would cost more than the rest of the write; only the planner, holding
    the task's row lock, writes here.

    Partitioned by `task_day`, the UTC day its task was created, one partition a day
    (service/core/partitions.py): a task never changes its day, so re-plans and retries
    never move a row between partitions, and a day's partition goes whole once its tasks
    are finished and old (service/retention/).
    """

    __tablename__ = "assignments"
    __table_args__ = (
        CheckConstraint(_in("status", AssignmentStatus), name="status"),
        Index(
            "ix_assignments_pending_by_slot",
            "limit_id",
            "slot_start",
            "task_id",
            "position",
            postgresql_where=text("status = 'pending'"),
        ),
        Index(
            "ix_assignments_retrying",
            "task_id",
            postgresql_where=text("status = 'retrying'"),
        ),
        Index(
            "ix_assignments_running_since",
            "claimed_at",
            postgresql_where=text("status = 'running'"),
        ),
        {"postgresql_partition_by": "RANGE (task_day)"},
    )

    task_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Its task's: part of the key, as a partitioned table's key must hold its partition's.
    task_day: Mapped[date] = mapped_column(Date, primary_key=True)
    user_id: Mapped[int] = mapped_column(BigInteger)
    # The task's limit, kept here so that a slot's claims read one index.
    limit_id: Mapped[int] = mapped_column(Integer)
    slot_start: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    status: Mapped[str] = mapped_column(String(16), default=AssignmentStatus.PENDING)
    attempts: Mapped[int] = mapped_column(SmallInteger, server_default="0")
    error: Mapped[str | None] = mapped_column(Text)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The claimer (see service/claimers.py) whose slot job holds this running ID.
    claimed_by: Mapped[int | None] = mapped_column(Integer)
    # The claim holds until then even if its worker looks stuck: it outlives the
    # longest call its processor may make.
    claimed_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When a retrying ID may run again.
    retry_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The downstream's refusals of it in a row: they use no attempt.
    refusals: Mapped[int] = mapped_column(SmallInteger, server_default="0")
    # The re-plan (a LimitEvent) that last moved it.
    replanned_in: Mapped[int | None] = mapped_column(BigInteger)


class LimitEvent(db.Model):
    """A change of a limit's learned rate, and the re-plan that followed it."""

    __tablename__ = "limit_events"
    __table_args__ = (Index("ix_limit_events_by_limit", "limit_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(start=1), primary_key=True)
    limit_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("limits.id", ondelete="CASCADE"), nullable=False
    )
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    kind: Mapped[str] = mapped_column(String(16))  # lowered, raised, reset
    reason: Mapped[str] = mapped_column(Text)
    from_rpm: Mapped[int] = mapped_column(Integer)
    to_rpm: Mapped[int] = mapped_column(Integer)
    moved: Mapped[int] = mapped_column(Integer, server_default="0", default=0)
    # When its re-plan ended; null while under way (or stopped for a newer one).
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class SharedSetting(db.Model):
    """A setting that every process of the deployment shares (service/shared_settings.py)."""

    __tablename__ = "settings"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class Deployment(db.Model):
    """This deployment's identity, made once at random. The idempotency key of every
    call downstream starts with it, so a rebuilt database or a second deployment never
    sends a key that another one sent."""

    __tablename__ = "deployment"
    __table_args__ = (CheckConstraint("single", name="single"),)

    # One row only: the primary key can only be true.
    single: Mapped[bool] = mapped_column(Boolean, primary_key=True, server_default=text("true"))
    id: Mapped[uuid.UUID] = mapped_column(Uuid, server_default=text("gen_random_uuid()"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class IdempotencyKey(db.Model):
    """The first answer to a POST that carried this Idempotency-Key (service/idempotency.py).

    Its row commits together with what the request did; until the answer is recorded
    beside it, `status_code` is null.
    """

    __tablename__ = "idempotency_keys"
    __table_args__ = (Index("ix_idempotency_keys_created_at", "created_at"),)

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    # sha256 of the method, path, query and body, in hex.
    request_hash: Mapped[str | None] = mapped_column(String(64))
    status_code: Mapped[int | None] = mapped_column(SmallInteger)
    content_type: Mapped[str | None] = mapped_column(String(255))
    body: Mapped[bytes | None] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class TokenScope(StrEnum):
    """What a token may do; each scope allows all that the ones before it allow."""

    READ = "read"
    SUBMIT = "submit"
    ADMIN = "admin"


class ApiToken(db.Model):
    """A token a client presents, kept only as its SHA-256 digest (service/web/tokens.py).

    The token itself is shown once, when it is created, and stored nowhere.
    """

    __tablename__ = "api_tokens"
    __table_args__ = (
        UniqueConstraint("name"),
        UniqueConstraint("digest"),
        CheckConstraint(_in("scope", TokenScope), name="scope"),
    )

    id: Mapped[int] = mapped_column(Integer, Identity(start=1), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    scope: Mapped[str] = mapped_column(String(8))
    digest: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # Written at most once a minute per token, not on every request.
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
