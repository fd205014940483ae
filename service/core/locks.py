"""Every PostgreSQL advisory lock the service takes: its namespace and how its key is
made, in one place, so that no two kinds of lock can ever share a key.

Advisory locks of one database share one key space with everything else that uses
them. Each kind here has a namespace of its own, carried in its key:

- one-bigint keys: the namespace in the top bits, then the limit's id in 16 bits, then a
  31-bit number (a window's since the epoch, a slot's start in seconds). A limit's id is
  an INTEGER and is taken modulo 2**16, so that it never reaches the namespace's bits:
  two limits whose ids are a multiple of 65,536 apart share their keys (their planners
  wait for each other; reconcile takes one's running slot for the other's, whose job it
  then adds once that run ends);
- two-integer keys: (namespace, number).

| namespace | kind | held by | for |
| --- | --- | --- | --- |
| WINDOW | bigint, transaction | a planner | planning into one window of a limit |
| CLAIMER | two keys, session | a slot job's own connection | the claimer is alive |
| SLOT | bigint, session, shared | a slot job's own connection | the slot is being run |
| IDEMPOTENCY_KEY | two keys, transaction | a request with the header | one answer per key |
| REPLAN | two keys, transaction | a chunk of a re-plan | one re-plan of a limit at a time |
| LIMIT_RUNNER | two keys, session | a slot job's own connection | one slot of a limit at a time |
| PARTITIONS | two keys, transaction or session | partition upkeep | one add (0), one drop (1) |
"""

from __future__ import annotations

import zlib
from datetime import datetime

WINDOW = 0x5107
CLAIMER = 0x5108
SLOT = 0x5109
IDEMPOTENCY_KEY = 0x510A
REPLAN = 0x510B
LIMIT_RUNNER = 0x510C
PARTITIONS = 0x510D


def _bigint_key(namespace: int, limit_id: int, number: int) -> int:
    return namespace << 47 | (limit_id % 2**16) << 31 | number % 2**31


def window_key(limit_id: int, window_number: int) -> int:
    """A window of a limit, by its number since the epoch."""
    return _bigint_key(WINDOW, limit_id, window_number)


def slot_key(limit_id: int, slot: datetime) -> int:
    """A slot of a limit, by its start."""
    return _bigint_key(SLOT, limit_id, int(slot.timestamp()))


def idempotency_key(key: str) -> int:
    """The second key of an Idempotency-Key's lock (a hash: two keys may share it, and
    then only wait for each other)."""
    return zlib.crc32(key.encode()) % 2**31


# Advisory locks belong to a database; other databases on the server hold their own.
_IN_THIS_DATABASE = (
    "locktype = 'advisory' AND granted "
    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)
# The second keys of the two-key locks of namespace :ns that are held.
HELD_TWO_KEY_LOCKS = (
    "SELECT objid::bigint AS key FROM pg_locks "
    f"WHERE classid = :ns AND objsubid = 2 AND {_IN_THIS_DATABASE}"
)
# The one-bigint keys of namespace :ns that are held: such a key shows as its high half
# (classid) and its low half (objid).
HELD_BIGINT_LOCKS = (
    "SELECT classid::bigint << 32 | objid::bigint AS key FROM pg_locks "
    f"WHERE objsubid = 1 AND classid::bigint >> 15 = :ns AND {_IN_THIS_DATABASE}"
)
# Whether a session other than the asking one holds the one-bigint lock :slot.
BIGINT_LOCK_HELD_ELSEWHERE = (
    "SELECT EXISTS (SELECT FROM pg_locks WHERE objsubid = 1 "
    "AND (classid::bigint << 32 | objid::bigint) = :slot AND pid <> pg_backend_pid() "
    f"AND {_IN_THIS_DATABASE})"
)
