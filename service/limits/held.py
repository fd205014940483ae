"""Held limits: limits written earlier whose destination this deployment no longer
allows (a URL outside DOWNSTREAM_URLS, a secret unset or bound to another prefix), after
an upgrade or a change of the settings.

Such a limit is never failed: its slots are held as a paused limit's are (its slot jobs
claim nothing, reconcile gives them no jobs, its IDs stay pending, tasks are still
planned into it) until the settings allow it (a restart with a new DOWNSTREAM_URLS or
secret) or its options change. Then, as after a resume, its IDs whose slot passed are
planned again from that moment, never sent as a burst (service/planning/resume.py).

Whether a limit is held is judged by each process from its own settings, whenever it
reads the limit; `limits.held_since` records that a process found it held, so that the
first process that finds it allowed again (reconcile, or a change of the limit) knows
that its overdue IDs are to be planned again.
"""

from __future__ import annotations

import logging

from flask import current_app
from sqlalchemy import select

from service.core.extensions import db
from service.core.models import Limit
from service.processors.contract import is_processor, load_processor, why_held

log = logging.getLogger(__name__)


def reason(processor_path: str, options: dict) -> str | None:
    """Why a limit with this processor and these options is held under this process's
    settings, or None. A processor that may not run at all (outside PROCESSOR_MODULES,
    not importable, not marked) holds nothing: its slot job fails its IDs saying why."""
    if processor_path.partition(":")[0] not in current_app.config["ALLOWED_PROCESSOR_MODULES"]:
        return None
    try:
        processor = load_processor(processor_path)
    except Exception:  # importing may raise anything; the slot job reports it
        return None
    return why_held(processor, options) if is_processor(processor) else None


def reason_of(limit: Limit) -> str | None:
    return reason(limit.processor, limit.options)


def was_held(limit: Limit) -> bool:
    """Held now, or found held by a process (perhaps under other settings) since it last
    ran: either way its overdue IDs wait for a re-plan."""
    return limit.held_since is not None or reason_of(limit) is not None


def held_limits() -> list[tuple[str, str]]:
    """(name, why) of every limit held under this process's settings, by name."""
    rows = db.session.execute(
        select(Limit.name, Limit.processor, Limit.options).order_by(Limit.name)
    ).all()
    found = [(name, reason(processor, options)) for name, processor, options in rows]
    return [(name, why) for name, why in found if why]


def log_held_limits() -> list[str]:
    """At a process's start: every held limit named in the log, with why; returns their
    names."""
    held = held_limits()
    db.session.commit()  # a read only: no transaction stays open while the process runs
    for name, why in held:
        log.warning(
            "limit %s is held: %s. Its slots run nothing and its IDs wait, pending, until "
            "the settings allow its destination or its options change",
            name,
            why,
            extra={"fields": {"limit": name, "held": why}},
        )
    return [name for name, _ in held]
