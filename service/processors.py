"""The processor contract: what a slot job hands the IDs whose turn has come to.

`ID_PROCESSOR` names a function (`module:function`) of one of two kinds:

- a **group** processor, `process(user_ids: list[int]) -> {user_id: Failure | str}`,
  called with the IDs due together and returning those that failed. It runs inside the
  transaction that records their outcomes, so what it writes to the database commits
  with them, or not at all. Declaring a `keys` parameter
  (`process(user_ids, keys)`) brings each ID's idempotency key alongside it.
- a **per-ID** processor, marked with `@per_id`: `process(user_id: int, key: str) ->
  Failure | str | None`, called once per ID at its turn, from a pool of threads, so that
  calls to a slow downstream overlap (up to PROCESSOR_CONCURRENCY at once) instead of
  delaying the IDs behind them. Its outcomes are recorded in batches, in transactions
  of their own: what it writes elsewhere is not undone with them.

Either kind signals a failure by returning it; an exception fails the ID (a group
processor's, every ID of the call).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module


@dataclass(frozen=True)
class Failure:
    """A processor's verdict on one ID; `retry` False means no further attempt."""

    message: str
    retry: bool = True


def per_id(function: Callable) -> Callable:
    """Mark a processor that takes one ID (and its key) a call and may run concurrently."""
    function.per_id = True
    return function


def load_processor(path: str) -> Callable:
    module_name, _, function = path.partition(":")
    return getattr(import_module(module_name), function)


def is_per_id(processor: Callable) -> bool:
    return getattr(processor, "per_id", False)


def takes_keys(processor: Callable) -> bool:
    return "keys" in inspect.signature(processor).parameters


def as_failure(verdict) -> Failure | None:
    """A processor's answer for one ID as a Failure, or None when it succeeded."""
    if verdict is None or isinstance(verdict, Failure):
        return verdict
    return Failure(str(verdict))
