"""Processors for the tests, named in ID_PROCESSOR or a limit like the built-in ones."""

import asyncio
import threading
import time

from flask import current_app
from marshmallow import Schema, fields

from service.core.extensions import db
from service.dispatch import claimers
from service.planning import resume as pausing
from service.processors.builtin import record_user
from service.processors.contract import Failure, Refused, per_id, processor


@processor
def fail_all(user_ids):
    return {user_id: "downstream said no" for user_id in user_ids}


@processor
def fail_for_good(user_ids):
    return {user_id: Failure("no such user downstream", retry=False) for user_id in user_ids}


@processor
def record_then_crash(user_ids):
    record_user(user_ids)
    raise RuntimeError("crashed after writing")


# The clock the pacing tests drive, and what `note_times` saw: (time, IDs) per call.
clock = None
calls: list = []


@processor
def note_times(user_ids):
    calls.append((clock.seconds(), list(user_ids)))
    return {}


@processor
def record_then_hang_on_20(user_ids):
    """Records as usual, but a call holding user 20 never returns in time."""
    record_user(user_ids)
    if 20 in user_ids:
        time.sleep(60)
    return {}


@processor
def record_slowly(user_ids):
    """`record_user`, with the time of a slow downstream call on top."""
    time.sleep(0.1)
    return record_user(user_ids)


class TagOptions(Schema):
    tag = fields.String(required=True)


# What `note_tag` saw: (its limit's tag, ID) per ID.
tagged: list = []


@processor
def note_tag(user_ids, options):
    """`record_user`, noting each ID under the tag its limit's options give."""
    tagged.extend((options["tag"], user_id) for user_id in user_ids)
    return record_user(user_ids)


note_tag.options_schema = TagOptions


@processor
def record_then_pause(user_ids):
    """`record_user`; meanwhile an operator pauses the limit named `partner`."""
    # A context of its own: the operator's session and transaction, not the slot job's.
    with current_app._get_current_object().app_context():
        pausing.pause("partner")
    return record_user(user_ids)


# When each call of `note_call_end` ended, by user ID (time.time()).
call_ends: dict = {}


@per_id
def note_call_end(user_id, key):
    """A per-ID call of a tenth of a second, noting when it ended."""
    time.sleep(0.1)
    call_ends[user_id] = time.time()


@processor
def fail_at_length(user_ids):
    """A downstream that answers every ID with a page of text."""
    return {user_id: "x" * 10_000 for user_id in user_ids}


@processor
def answer_a_list(user_ids):
    """A group processor with a bug: it answers a list, not a mapping of failures."""
    return list(user_ids)


def not_a_processor(user_ids):
    """A function of an allowed module, not marked as a processor."""
    return {}


@processor
def refuse_odd(user_ids):
    """Refuses the odd IDs for 30 s (as a busy downstream would); the even ones pass."""
    return {
        user_id: Refused("busy: try later", retry_after=30) for user_id in user_ids if user_id % 2
    }


@per_id
def refuse_every_call(user_id, key):
    return Refused("no capacity now")


# When each call of `note_call_start` began, by user ID (time.time()).
call_starts: dict = {}


@per_id
def note_call_start(user_id, key):
    call_starts[user_id] = time.time()


# When each call of `note_call_start_async` began, by user ID (time.time()).
async_call_starts: dict = {}


@per_id
async def note_call_start_async(user_id, key):
    """An async per-ID call of a fifth of a second, noting when it began."""
    async_call_starts[user_id] = time.time()
    await asyncio.sleep(0.2)


@per_id
async def fail_odd_async(user_id, key):
    """Fails the odd IDs by returning a failure, raises on multiples of ten."""
    call_threads.add(threading.current_thread().name)
    if user_id % 10 == 0:
        raise ValueError(f"no user {user_id}")
    return Failure("odd") if user_id % 2 else None


@per_id
async def hang_async(user_id, key):
    """A call that would last a minute, declaring that it lasts at most 0.3 s."""
    await asyncio.sleep(60)


hang_async.longest_call = lambda options: 0.3


@per_id
async def time_out_by_itself(user_id, key):
    """A call whose own wait for its downstream times out, well within its longest."""
    await asyncio.wait_for(asyncio.sleep(10), timeout=0.05)


time_out_by_itself.longest_call = lambda options: 5.0


@per_id
async def stop_the_worker_at_3(user_id, key):
    """As a worker's warm stop would, asks the slot job to stop at ID 3's call."""
    async_call_starts[user_id] = time.time()
    if user_id == 3:
        claimers.request_stop()
    await asyncio.sleep(0.05)


# (the app's name, the id of the session) as each call of `note_app_context` saw them.
async_contexts: list = []


@per_id
async def note_app_context(user_id, key):
    async_contexts.append((current_app.name, id(db.session())))


# The threads that calls of `fail_odd_sync` and `fail_odd_async` ran on.
call_threads: set = set()


@per_id
def fail_odd_sync(user_id, key):
    """`fail_odd_async`, written as a plain function: the thread pool calls it."""
    call_threads.add(threading.current_thread().name)
    if user_id % 10 == 0:
        raise ValueError(f"no user {user_id}")
    return Failure("odd") if user_id % 2 else None
