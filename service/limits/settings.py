"""Settings that every process of a deployment must agree on, recorded in PostgreSQL.

The first process to start records its values. Planning and dispatch read the recorded
ones when they use them, so every process, on any machine, plans and runs by the same
values, and a change applies to all of them from then on. A process whose environment
sets a different value refuses to start and says which, and how to change it for the
whole deployment: `flask settings set NAME=VALUE`. RPM, SPREAD_MIN_OPEN_SLOTS and
MAX_ATTEMPTS may change at any time; SLOT_SECONDS and WINDOW_SLOTS redraw every slot,
so only while no ID is waiting to run.

RPM is the `default` limit's (service/limits.py), recorded in its row and nowhere else:
the setting, the environment's check and `flask settings` read and change that row.
"""

from __future__ import annotations

from flask import current_app
from sqlalchemy import select, text
from sqlalchemy.dialects.postgresql import insert

from service.core.config import ConfigError
from service.core.extensions import db
from service.core.models import UNPLANNED, AssignmentStatus, SharedSetting
from service.limits import store as limits

SHARED = ("SLOT_SECONDS", "WINDOW_SLOTS", "SPREAD_MIN_OPEN_SLOTS", "MAX_ATTEMPTS")
# Settings that are the default limit's fields.
OF_THE_DEFAULT_LIMIT = ("RPM",)
REDRAWING = ("SLOT_SECONDS", "WINDOW_SLOTS")


class SettingsConflict(ConfigError):
    """This process's settings, or a requested change, disagree with the deployment's."""


def shared(lock: bool = False) -> dict[str, int]:
    """The deployment's values; this app's own for any not recorded yet.

    With `lock`, the rows stay share-locked until the transaction ends, so that a change
    waits for the planning that read them.
    """
    query = select(SharedSetting.name, SharedSetting.value)
    if lock:
        query = query.with_for_update(read=True)
    values = {name: current_app.config[name] for name in SHARED}
    values.update({name: value for name, value in db.session.execute(query) if name in SHARED})
    return values


def record_and_check() -> dict[str, int]:
    """At a process's start: record the values if none are yet, then refuse to start if
    the environment sets one that differs from the recorded."""
    config = current_app.config
    db.session.execute(
        insert(SharedSetting)
        .values([{"name": name, "value": config[name]} for name in SHARED])
        .on_conflict_do_nothing()
    )
    recorded = in_force()
    db.session.commit()
    differing = [
        name
        for name in (*SHARED, *OF_THE_DEFAULT_LIMIT)
        if name in config["EXPLICIT_SETTINGS"] and config[name] != recorded[name]
    ]
    if differing:
        here = ", ".join(f"{name}={config[name]}" for name in differing)
        theirs = ", ".join(f"{name}={recorded[name]}" for name in differing)
        raise SettingsConflict(
            f"this process is set to {here}, but the deployment runs by {theirs} "
            f"(recorded in PostgreSQL). Unset the variable to use the deployment's value, "
            f"or change it for every process with: flask settings set {here}"
        )
    return recorded


def change(changes: dict[str, int]) -> dict[str, int]:
    """Change shared settings for the whole deployment; returns the values now in force."""
    unknown = sorted(set(changes) - set(SHARED) - set(OF_THE_DEFAULT_LIMIT))
    if unknown:
        raise SettingsConflict(f"not a shared setting: {', '.join(unknown)}")
    # Waits for planning under way (it share-locks the rows it planned by), and holds
    # off new planning until the change commits.
    db.session.execute(text("LOCK TABLE settings IN EXCLUSIVE MODE"))
    current = shared()
    rpm = changes.pop("RPM", None)
    values = {**current, **changes}
    if "WINDOW_SLOTS" in changes and "SPREAD_MIN_OPEN_SLOTS" not in changes:
        values["SPREAD_MIN_OPEN_SLOTS"] = -(-values["WINDOW_SLOTS"] // 2)
    _check(values if rpm is None else {**values, "RPM": rpm})
    redrawn = [name for name in REDRAWING if values[name] != current[name]]
    waiting = _tasks_waiting() if redrawn else []
    if waiting:
        db.session.rollback()
        raise SettingsConflict(
            f"{' and '.join(redrawn)} can change only while no ID is waiting to run: "
            f"they redraw every slot. {_still_waiting(waiting)}: let them run, or cancel "
            "them (DELETE /celery_ids_tasks/<id>/), first"
        )
    db.session.execute(
        insert(SharedSetting)
        .values([{"name": name, "value": value} for name, value in values.items()])
        .on_conflict_do_update(
            index_elements=["name"],
            set_={"value": insert(SharedSetting).excluded.value, "updated_at": text("now()")},
        )
    )
    if rpm is not None:
        limits.set_default_rpm(rpm)
    db.session.commit()
    return in_force()


def in_force() -> dict[str, int]:
    """Every shared setting, RPM read from the default limit."""
    return {"RPM": limits.find(limits.DEFAULT).rpm, **shared()}


def _check(values: dict[str, int]) -> None:
    for name, value in values.items():
        if value < 1:
            raise SettingsConflict(f"{name} must be at least 1, got {value}")
    if values["SPREAD_MIN_OPEN_SLOTS"] > values["WINDOW_SLOTS"]:
        raise SettingsConflict(
            f"SPREAD_MIN_OPEN_SLOTS ({values['SPREAD_MIN_OPEN_SLOTS']}) must not exceed "
            f"WINDOW_SLOTS ({values['WINDOW_SLOTS']})"
        )


# A refusal names at most this many of the tasks that hold it up.
TASKS_NAMED = 10


def _tasks_waiting() -> list[int]:
    """The tasks with IDs still to run (planned, running, retrying, or not planned yet),
    lowest first; one more than TASKS_NAMED at most."""
    return db.session.scalars(
        text(
            "SELECT id FROM id_tasks WHERE status = ANY(:unplanned) "
            "  OR id IN (SELECT DISTINCT task_id FROM assignments WHERE status = ANY(:waiting)) "
            "ORDER BY id LIMIT :most"
        ),
        {
            "most": TASKS_NAMED + 1,
            "waiting": [
                AssignmentStatus.PENDING,
                AssignmentStatus.RUNNING,
                AssignmentStatus.RETRYING,
            ],
            "unplanned": list(UNPLANNED),
        },
    ).all()


def _still_waiting(task_ids: list[int]) -> str:
    listed = ", ".join(str(task_id) for task_id in task_ids[:TASKS_NAMED])
    if len(task_ids) == 1:
        return f"Task {listed} still waits to run"
    more = " and more" if len(task_ids) > TASKS_NAMED else ""
    return f"Tasks {listed}{more} still wait to run"
