"""The processor contract: what a slot job hands a limit's IDs to, and how it answers.

Each limit names its processor, a function given as `module:function` (the `default`
limit's comes from `ID_PROCESSOR`), of one of two kinds:

- a **group** processor, marked with `@processor`:
  `process(user_ids: list[int]) -> {user_id: Failure | str}`, called with the IDs due
  together and returning those that failed. It runs inside the transaction that
  records their outcomes, so what it writes to the database commits with them, or not
  at all. Declaring a `keys` parameter
  (`process(user_ids, keys)`) brings each ID's idempotency key alongside it.
- a **per-ID** processor, marked with `@per_id`: `process(user_id: int, key: str) ->
  Failure | str | None`, called once per ID at its turn, so that calls to a slow
  downstream overlap instead of delaying the IDs behind them. An `async def` one is
  awaited on the slot job's one event loop (up to PROCESSOR_ASYNC_CONCURRENCY at
  once, each cut short after its `longest_call`); a plain one is called from a pool of
  threads (up to PROCESSOR_CONCURRENCY). Its outcomes are recorded in batches, in
  transactions of their own: what it writes elsewhere is not undone with them.

Either kind signals a failure by returning it; an exception fails the ID (a group
processor's, every ID of the call). A `Refused` verdict says the downstream refused the
call for now (it is busy: HTTP 429 or 503): that is no failure of the ID, which uses up
no attempt and is planned again no sooner than its `retry_after`; and it teaches the
limit a lower rate (service/limits/learning.py).

A processor may take **options**, what it needs to know about its downstream (a URL, a
timeout), set on each limit that uses it: it declares a marshmallow schema as its
`options_schema` attribute, which checks a limit's options when they are written (a
limit refuses options for a processor that declares none), and an `options` parameter,
through which each call gets its limit's options as that schema loaded them. A
processor whose options name a destination the operator controls (a URL, a secret)
declares `why_held(options)`: a limit written earlier whose options the deployment no
longer allows is then held, not failed.

The built-in processors are in service/processors/builtin.py; limits name them by
their public paths under `workers.processors`, which stored limits hold.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module


@dataclass(frozen=True)
class Failure:
    """A processor's verdict on one ID; `retry` False means no further attempt."""

    message: str
    retry: bool = True


@dataclass(frozen=True)
class Refused(Failure):
    """The downstream refused the call for now: try again no sooner than `retry_after`
    seconds (None: when the service thinks fit). No attempt is used up; a limit's
    `max_refusals` in a row fail the ID for good. `status` is the HTTP status that said
    so, when there is one."""

    message: str = "refused by the downstream"
    retry_after: float | None = None
    status: int | None = None


def per_id(function: Callable) -> Callable:
    """Mark a processor that takes one ID (and its key) a call and may run concurrently."""
    function.per_id = True
    return function


def processor(function: Callable) -> Callable:
    """Mark a group processor: it takes the IDs due together, in the transaction that
    records them. Only marked functions are processors, so a limit cannot name any
    other function of an allowed module (a helper, an import) as one."""
    function.group_processor = True
    return function


# What a function needs to be a processor.
NOT_MARKED = "decorate it with @processor (a group processor) or @per_id"


def is_processor(candidate) -> bool:
    return getattr(candidate, "per_id", False) or getattr(candidate, "group_processor", False)


def refusing(path: str, reason: str) -> Callable:
    """A group processor that fails every ID for good, saying why: what a slot job runs
    in place of a limit's processor that it must not call."""

    @processor
    def refuse(user_ids: list[int]) -> dict[int, Failure]:
        return dict.fromkeys(user_ids, Failure(f"{path} {reason}", retry=False))

    return refuse


def load_processor(path: str) -> Callable:
    module_name, _, function = path.partition(":")
    return getattr(import_module(module_name), function)


def is_per_id(processor: Callable) -> bool:
    return getattr(processor, "per_id", False)


def longest_call(processor: Callable, options: dict) -> float | None:
    """Seconds that one call of a per-ID processor may last at most, when it says so (a
    `longest_call` attribute, given its limit's options): a claim must outlive it."""
    declared = getattr(processor, "longest_call", None)
    return declared(options) if declared else None


def prepare(processor: Callable, options: dict) -> object:
    """Let a per-ID processor make ready what its first call would otherwise make (a
    pooled client, a resolved address), when it says how (a `prepare` attribute, given
    its limit's options): called once per slot job before the slot's first turn, so
    that the first calls, held up by it, do not go out together. An async processor's
    `prepare` may be `async def` too: it is then awaited on the slot job's loop, and
    its result returned for the caller to await."""
    declared = getattr(processor, "prepare", None)
    if declared:
        return declared(options)
    return None


def is_async(processor: Callable) -> bool:
    """A per-ID processor written as `async def`: awaited on an event loop."""
    return is_per_id(processor) and inspect.iscoroutinefunction(processor)


async def close(processor: Callable, options: dict) -> None:
    """Let an async per-ID processor close what it opened on a slot job's event loop (a
    pooled client), when it says how (an async `close` attribute, given its limit's
    options): awaited on that loop once the slot job's last call has ended."""
    declared = getattr(processor, "close", None)
    if declared:
        await declared(options)


def why_held(processor: Callable, options: dict) -> str | None:
    """Why a limit's stored options may not be used under this deployment's settings
    (its destination is no longer allowed), when the processor says (a `why_held`
    attribute, given the options), else None. Such a limit is held: its slots run
    nothing and its IDs wait, as a paused limit's do, until the settings or the options
    allow it again."""
    declared = getattr(processor, "why_held", None)
    return declared(options) if declared else None


@functools.cache  # asked once per group of IDs; a signature is slow to read
def takes(processor: Callable, parameter: str) -> bool:
    return parameter in inspect.signature(processor).parameters


# A stored error text holds at most this many characters: a downstream's answer may be a
# page long, and every ID of a task keeps its own.
MAX_ERROR_CHARS = 500


def bounded(message: str) -> str:
    """The message as it is stored: cut to MAX_ERROR_CHARS, saying so with an ellipsis."""
    if len(message) <= MAX_ERROR_CHARS:
        return message
    return message[: MAX_ERROR_CHARS - 1] + "…"


def as_failure(verdict) -> Failure | None:
    """A processor's answer for one ID as a Failure, or None when it succeeded."""
    if verdict is None or isinstance(verdict, Failure):
        return verdict
    return Failure(str(verdict))
