"""The limit resource: listing, reading, creating, changing and deleting limits, each
with the counts of its IDs; a limit's processor (from PROCESSOR_MODULES only) and its
options are checked when they are written. Pausing and resuming, which re-plan, are
service/planning/resume.py's."""

from __future__ import annotations

from flask import current_app
from marshmallow import ValidationError
from sqlalchemy import select

from service.core.errors import Conflict, Refused
from service.core.extensions import db
from service.core.models import DEFAULT_MAX_REFUSALS, Limit
from service.limits import held, store
from service.limits.learning import capacity
from service.processors.contract import NOT_MARKED, is_processor, load_processor


def list_limits() -> list[dict]:
    store.find(store.DEFAULT)  # listed even before its first use
    limits = db.session.scalars(select(Limit).order_by(Limit.name)).all()
    ids = [limit.id for limit in limits]
    counts, learned = store.counts(ids), store.learned_rates(ids)
    return [_answer(limit, counts, learned.get(limit.id)) for limit in limits]


def read_limit(name: str) -> dict:
    return answer(store.get_limit(name))


def answer(limit: Limit) -> dict:
    """A limit as the API shows it, with the counts of its IDs and its learned rate."""
    return _answer(limit, store.counts([limit.id]), store.learned_rates([limit.id]).get(limit.id))


def create_limit(fields: dict) -> dict:
    """A new limit; its name is taken (409, mapped from the unique constraint) or not."""
    processor = fields.get("processor", store.DEFAULT_PROCESSOR)
    options = checked_options(processor, fields.get("options", {}))
    limit = Limit(
        name=fields["name"],
        rpm=fields["rpm"],
        processor=processor,
        options=options,
        paused=fields.get("paused", False),
        adaptive=fields.get("adaptive", True),
        max_refusals=fields.get("max_refusals", DEFAULT_MAX_REFUSALS),
    )
    db.session.add(limit)
    db.session.commit()
    return _answer(limit, {}, None)


def change_fields(limit: Limit, changes: dict) -> None:
    """Apply a change of RPM, processor, options or the refusal rules to a limit whose
    row is locked (CHANGE); `paused` and the learned rate are
    service/planning/resume.py's. A new RPM applies to planning from then
    on (it waits for planning under way); the IDs planned already keep their slots. A
    new processor or options apply from the next slot that runs."""
    processor = changes.get("processor", limit.processor)
    options = changes.get("options", limit.options)
    if "processor" in changes or "options" in changes:
        limit.processor, limit.options = processor, checked_options(processor, options)
    if "rpm" in changes:
        limit.rpm = changes["rpm"]
    for name in ("adaptive", "max_refusals"):
        if name in changes:
            setattr(limit, name, changes[name])


def delete_limit(name: str) -> None:
    """Only a limit none of whose IDs waits can go; its slots go with it, its finished
    tasks stay, naming no limit."""
    limit = store.get_limit(name, store.REMOVE)  # a task naming it meanwhile waits, then finds none
    if limit.name == store.DEFAULT:
        raise Conflict("the default limit takes every task that names none: it stays")
    pending = store.counts([limit.id]).get(limit.id, {}).get("pending", 0)
    if pending:
        raise Conflict(
            f"limit {name!r} has {pending} pending IDs: let them run, or cancel their tasks, first"
        )
    db.session.delete(limit)
    db.session.commit()


def checked_options(processor_path: str, options: dict) -> dict:
    """The options as the processor's own schema loads them; 422 when the processor
    lies outside PROCESSOR_MODULES, cannot be imported or refuses them. A processor
    without a schema takes none."""
    module = processor_path.partition(":")[0]
    allowed = current_app.config["ALLOWED_PROCESSOR_MODULES"]
    if module not in allowed:
        reason = f"its module must be one of PROCESSOR_MODULES: {', '.join(sorted(allowed))}"
        raise Refused("the processor is not usable", {"processor": [reason]})
    try:
        processor = load_processor(processor_path)
    except Exception as exc:  # importing a module may raise anything; the name is the client's
        reason = f"cannot be imported: {type(exc).__name__}: {exc}"
        raise Refused("the processor is not usable", {"processor": [reason]}) from None
    if not callable(processor):
        raise Refused("the processor is not usable", {"processor": ["is not a function"]})
    if not is_processor(processor):
        reason = f"is not marked as a processor: {NOT_MARKED}"
        raise Refused("the processor is not usable", {"processor": [reason]})
    schema = getattr(processor, "options_schema", None)
    if schema is None:
        if options:
            raise Refused("the options are refused", {"options": ["the processor takes none"]})
        return {}
    try:
        return schema().load(options)
    except ValidationError as exc:
        raise Refused("the options are refused", {"options": exc.messages}) from None


def _answer(limit: Limit, counts: dict, learned) -> dict:
    """A limit as the API shows it, with the counts of its IDs and what its downstream's
    refusals taught it (`learned`, its row of learned_rates, if it has one)."""
    return {
        "name": limit.name,
        "rpm": limit.rpm,
        "processor": limit.processor,
        "options": limit.options,
        "paused": limit.paused,
        "held": held.reason_of(limit),
        "adaptive": limit.adaptive,
        "max_refusals": limit.max_refusals,
        "learned_rpm": capacity(limit.rpm, learned.learned_rpm if learned else None),
        "refusals": learned.refusals if learned else 0,
        "last_refusal": _last_refusal(learned),
        **counts.get(limit.id, {"pending": 0, "done": 0, "failed": 0}),
    }


def _last_refusal(learned) -> dict | None:
    if learned is None or learned.last_refusal_at is None:
        return None
    return {
        "at": learned.last_refusal_at,
        "status": learned.last_refusal_status,
        "retry_after": learned.last_refusal_retry_after,
        "reason": learned.last_refusal_reason,
    }


def list_events(name: str, offset: int, size: int) -> tuple[list, int]:
    """A page of the changes of a limit's learned rate, newest first, and how many."""
    return store.events_page(store.get_limit(name).id, offset, size)
