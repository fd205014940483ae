"""Operator commands: `flask worker`, `flask scheduler`, `flask plan show`,
`flask tasks submit`, `flask limits ...`, `flask tokens ...` (and `flask db` from
Flask-Migrate)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from itertools import repeat

import click
from flask import current_app
from flask.cli import AppGroup, with_appcontext
from marshmallow import ValidationError
from rq import Queue
from sqlalchemy.exc import IntegrityError

from service.core.errors import DomainError, unique_violation
from service.core.extensions import db, get_redis, worker_redis
from service.core.models import DEFAULT_MAX_REFUSALS, Limit, Overflow
from service.core.outages import (
    describe,
    forget_session,
    is_outage,
    keep_running,
    lock_not_granted,
    quiet_library_tracebacks,
    wait_for_servers,
)
from service.dispatch.reconcile import reconcile
from service.dispatch.worker import serve
from service.jobs import ALL_QUEUES, SLOTS_QUEUE, ServiceScheduler
from service.limits import held
from service.limits import services as limit_services
from service.limits import settings as shared_settings
from service.limits import store as limits
from service.limits.settings import SettingsConflict
from service.planning import horizon
from service.planning import resume as pausing
from service.planning.reading import ids_by_slot, plan_between
from service.retention import services as retention
from service.tasks.ids import InvalidIds, stream_ids
from service.tasks.services import submit_task
from service.web import idempotency, tokens
from service.web.schemas import LimitCreateSchema

log = logging.getLogger(__name__)

# rq-scheduler polls every 60 s by default, which would start slots up to a minute late.
SCHEDULER_INTERVAL_SECONDS = 1


@click.command("worker")
@click.option(
    "--queue",
    "-q",
    "queues",
    multiple=True,
    default=ALL_QUEUES,
    show_default=True,
    help="Queue to serve; repeat for several, earlier ones first.",
)
@click.option("--burst", is_flag=True, help="Quit once the queues are empty.")
@with_appcontext
def worker_command(queues: tuple[str, ...], burst: bool) -> None:
    """Run an RQ worker inside the app context; it outlives any outage of PostgreSQL or
    Redis."""
    quiet_library_tracebacks()
    _agree_with_the_deployment()

    def make_queues() -> list[Queue]:
        connection = worker_redis()
        return [Queue(name, connection=connection) for name in queues]

    serve(make_queues, burst)


@click.command("scheduler")
@click.option("--burst", is_flag=True, help="Move the due jobs once, then quit.")
@with_appcontext
def scheduler_command(burst: bool) -> None:
    """Run rq-scheduler, polling every second, and reconcile (and delete expired
    idempotency keys) every RECONCILE_INTERVAL_SECONDS; it outlives any outage of
    PostgreSQL or Redis."""
    quiet_library_tracebacks()
    _agree_with_the_deployment()

    # A scheduler started again (its last run met an outage) reconciles as after one.
    started_before = False

    def run_once() -> bool:
        nonlocal started_before
        scheduler = ServiceScheduler(
            queue_name=SLOTS_QUEUE,
            connection=get_redis(),
            interval=SCHEDULER_INTERVAL_SECONDS,
            maintenance=_maintenance,
            maintenance_seconds=current_app.config["RECONCILE_INTERVAL_SECONDS"],
            after_outage=started_before,
        )
        started_before = True
        scheduler.run(burst=burst)
        return True  # it returns only in burst mode; a stop signal exits the process

    keep_running(run_once, "the scheduler")


def _maintenance(after_outage: bool = False) -> None:
    # Keys and days first: they need only PostgreSQL, reconcile needs Redis too.
    idempotency.delete_expired()
    _keep_days()
    reconcile(after_outage)


def _keep_days() -> None:
    """Retention, which a failure of must not keep reconcile from running: a lock not
    granted in time, or an outage, is tried again at the next run."""
    try:
        retention.keep_days()
    except Exception as error:
        forget_session()
        if is_outage(error) or lock_not_granted(error):
            log.warning("retention deferred to the next run: %s", describe(error))
        else:
            log.exception("retention failed; tried again at the next run")


def _agree_with_the_deployment() -> None:
    """Record the shared settings, or refuse to start if they differ; then name in the
    log the limits held under this process's settings. A database that is away is
    waited for, not a reason to exit."""
    try:
        wait_for_servers(shared_settings.record_and_check, "waiting for PostgreSQL")
    except SettingsConflict as conflict:
        raise click.ClickException(str(conflict)) from None
    wait_for_servers(held.log_held_limits, "waiting for PostgreSQL")


MOMENT_FORMATS = [
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%d %H:%M",
    "%Y-%m-%dT%H:%M:%S",
    "%Y-%m-%dT%H:%M",
    "%Y-%m-%d",
]

plan_group = AppGroup("plan", help="Read the plan.")
tasks_group = AppGroup("tasks", help="Submit and follow ID tasks.")
settings_group = AppGroup("settings", help="Settings that every process shares.")
limits_group = AppGroup("limits", help="Limits: named downstreams, each with its own RPM.")
tokens_group = AppGroup("tokens", help="API tokens: each with a name and a scope.")


@settings_group.command("show")
def settings_show() -> None:
    """Print the values the deployment runs by."""
    for name, value in shared_settings.in_force().items():
        click.echo(f"{name}={value}")


@settings_group.command("set")
@click.argument("assignments", nargs=-1, metavar="NAME=VALUE...")
@click.option("--from-env", is_flag=True, help="Apply the shared settings this environment sets.")
def settings_set(assignments: tuple[str, ...], from_env: bool) -> None:
    """Change shared settings for every process of the deployment."""
    changes = {
        name: current_app.config[name]
        for name in (*shared_settings.SHARED, *shared_settings.OF_THE_DEFAULT_LIMIT)
        if from_env and name in current_app.config["EXPLICIT_SETTINGS"]
    }
    for assignment in assignments:
        name, _, value = assignment.partition("=")
        try:
            changes[name.strip().upper()] = int(value)
        except ValueError:
            raise click.BadParameter(f"{assignment!r} is not NAME=whole number") from None
    try:
        values = shared_settings.change(changes)
    except SettingsConflict as conflict:
        raise click.ClickException(str(conflict)) from None
    for name, value in values.items():
        click.echo(f"{name}={value}")


@plan_group.command("show")
@click.option(
    "--at",
    "moment",
    type=click.DateTime(MOMENT_FORMATS),
    help="A moment of the first window shown, UTC (default: now).",
)
@click.option("--windows", default=1, show_default=True, type=click.IntRange(1, 96))
@click.option(
    "--rows",
    default=12,
    show_default=True,
    type=click.IntRange(0, 1000),
    help="IDs listed under each slot; beyond that, only counts.",
)
@click.option("--limit", "limit_name", default=limits.DEFAULT, show_default=True)
def plan_show(moment: datetime | None, windows: int, rows: int, limit_name: str) -> None:
    """Print a limit's windows as a grid: a column per slot, its IDs under it, RPM marked."""
    start = moment.replace(tzinfo=UTC) if moment else None
    limit = _limit_named(limit_name)
    plan = plan_between(start, None, windows=windows, limit_name=limit.name)
    for window in plan["windows"]:
        listed = ids_by_slot(limit.id, window["start"], window["end"], rows)
        click.echo(render_window(window, plan["rpm"], listed, rows, plan["learned_rpm"]))
        click.echo()


@plan_group.command("reconcile")
def plan_reconcile() -> None:
    """Rebuild the schedule from PostgreSQL: jobs for slots with pending IDs within
    SCHEDULE_AHEAD_MINUTES, late slots run at once, stale claims released, lost planning
    jobs queued again."""
    for what, count in reconcile().items():
        click.echo(f"{what}: {count}")


@plan_group.command("retention")
@click.option(
    "--as-of",
    "moment",
    type=click.DateTime(MOMENT_FORMATS),
    help="Judge what is past RETENTION_DAYS as at this moment, UTC (default: now).",
)
def plan_retention(moment: datetime | None) -> None:
    """Make the days' partitions ahead, and drop the days of IDs whose tasks all
    finished RETENTION_DAYS ago (the scheduler does both as it reconciles)."""
    upkeep = retention.keep_days(moment.replace(tzinfo=UTC) if moment else None)
    click.echo(f"partitions made: {_days(upkeep.made)}")
    click.echo(f"days removed: {_days(upkeep.removed)} ({upkeep.tasks} tasks)")
    click.echo(f"slots deleted: {upkeep.slots}; re-plan events deleted: {upkeep.events}")


def _days(days: list) -> str:
    return ", ".join(day.isoformat() for day in days) or "none"


def render_window(
    window: dict, rpm: int, listed: dict, rows: int, learned: int | None = None
) -> str:
    """A window as text: headers, the IDs of each slot top-down, a rule after the row of
    the slot capacity (RPM, or the learned rate below it)."""
    capacity = learned if learned is not None and learned < rpm else rpm
    rule = f"RPM {rpm}" if capacity == rpm else f"learned {capacity} (RPM {rpm})"
    slots = window["slots"]
    labels = [_label(slot["start"]) for slot in slots]
    width = max(len(label) for label in labels)
    width = max(width, *(len(str(i)) for ids in listed.values() for i in ids), 1)

    def cell(value) -> str:
        return str(value).rjust(width)

    lines = [
        f"window {_label(window['start'])}-{_label(window['end'])} UTC: "
        f"{window['load']} IDs planned, capacity {window['capacity']} ({rule})",
        " ".join(cell(label) for label in labels),
    ]
    depth = min(rows, max((slot["load"] for slot in slots), default=0))
    for row in range(depth):
        if row == capacity:
            lines.append(" ".join("-" * width for _ in slots) + f"  {rule}")
        values = [listed.get(slot["start"], []) for slot in slots]
        lines.append(" ".join(cell(ids[row]) if row < len(ids) else cell("") for ids in values))
    if any(slot["load"] > depth for slot in slots):
        lines.append(" ".join(cell(":") if slot["load"] > depth else cell("") for slot in slots))
    lines.append(" ".join(cell(slot["load"]) for slot in slots) + "  load")
    lines.append(" ".join(cell("open" if slot["open"] else "") for slot in slots).rstrip())
    return "\n".join(line.rstrip() for line in lines)


def _label(moment: datetime) -> str:
    return f"{moment:%H:%M}" if moment.second == 0 else f"{moment:%H:%M:%S}"


@tasks_group.command("submit")
@click.argument("source", type=click.File("rb"))
@click.option("--name", "task_name", required=True, help="The task's name.")
@click.option(
    "--overflow",
    # By value: click matches the members of an enum given as choices by their names.
    type=click.Choice([overflow.value for overflow in Overflow]),
    default=Overflow.SPREAD.value,
    show_default=True,
)
@click.option("--limit", "limit_name", default=limits.DEFAULT, show_default=True)
def tasks_submit(source, task_name: str, overflow: str, limit_name: str) -> None:
    """Submit the IDs of SOURCE (a file, or - for stdin), streamed, with a progress bar."""
    size = _size_of(source)
    # A pipe has no known size: the bar then counts bytes without a total.
    bar_options = {"length": size} if size is not None else {"iterable": repeat(None)}
    with click.progressbar(
        label="sending IDs", file=sys.stderr, show_pos=size is None, **bar_options
    ) as bar:
        try:
            ids = stream_ids(_Progress(source, bar))
            limit = _limit_named(limit_name).name
            with _refusals_as_errors():
                task = submit_task(task_name, ids, overflow, limit=limit, admit=horizon.admit)
        except InvalidIds as invalid:
            for bad in invalid.listed:
                click.echo(str(bad), err=True)
            if invalid.invalid > len(invalid.listed):
                click.echo(f"and {invalid.invalid - len(invalid.listed)} more", err=True)
            click.echo(str(invalid), err=True)
            raise click.exceptions.Exit(1) from None
    click.echo(
        f"task {task.id}: {task.total} IDs ({task.duplicates} duplicates dropped), "
        f"queued for planning"
    )


def _limit_named(name: str) -> Limit:
    limit = limits.find(name)
    if limit is None:
        raise click.BadParameter(f"no limit is named {name!r}", param_hint="--limit")
    return limit


@limits_group.command("list")
def limits_list() -> None:
    """Print each limit: name, RPM, learned rate, processor, whether paused (and held),
    IDs pending."""
    rows = [("name", "rpm", "learned", "processor", "paused", "pending")]
    rows += [
        (
            row["name"],
            row["rpm"],
            row["learned_rpm"] if row["adaptive"] else "off",
            row["processor"],
            ("yes" if row["paused"] else "no") + (" (held)" if row["held"] else ""),
            row["pending"],
        )
        for row in limit_services.list_limits()
    ]
    _echo_table(rows)


def _echo_table(rows: list[tuple]) -> None:
    """Rows as columns padded to their widest value, the first row the header."""
    widths = [max(len(str(row[column])) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(str(value).ljust(width) for value, width in zip(row, widths)).rstrip())


@limits_group.command("create")
@click.argument("name")
@click.option("--rpm", type=int, required=True, help="IDs a slot takes before spreading.")
@click.option("--processor", default=limits.DEFAULT_PROCESSOR, show_default=True)
@click.option(
    "--option",
    "options",
    multiple=True,
    metavar="KEY=VALUE",
    help="An option of the processor; repeat for several.",
)
@click.option(
    "--adaptive/--not-adaptive",
    default=True,
    show_default=True,
    help="Whether the downstream's refusals lower the limit's learned rate.",
)
@click.option(
    "--max-refusals",
    type=int,
    default=DEFAULT_MAX_REFUSALS,
    show_default=True,
    help="Refusals of one ID in a row that fail it.",
)
def limits_create(
    name: str,
    rpm: int,
    processor: str,
    options: tuple[str, ...],
    adaptive: bool,
    max_refusals: int,
) -> None:
    """Create a limit NAME, checked as POST /limits/ checks it."""
    given = {
        "name": name,
        "rpm": rpm,
        "processor": processor,
        "options": _options(options),
        "adaptive": adaptive,
        "max_refusals": max_refusals,
    }
    with _refusals_as_errors():
        created = limit_services.create_limit(LimitCreateSchema().load(given))
    click.echo(f"limit {created['name']}: rpm {created['rpm']}, processor {created['processor']}")


@limits_group.command("pause")
@click.argument("name")
def limits_pause(name: str) -> None:
    """Stop the slots of limit NAME from running; its IDs wait, pending."""
    with _refusals_as_errors():
        pausing.pause(name)
    click.echo(f"limit {name} paused: its slots run nothing until it is resumed")


@limits_group.command("resume")
@click.argument("name")
def limits_resume(name: str) -> None:
    """Let the slots of limit NAME run again; IDs whose slot passed meanwhile are planned
    again from now, by the usual rules."""
    with _refusals_as_errors():
        replanned = pausing.resume(name)
    click.echo(f"limit {name} resumed: {replanned} IDs whose slot had passed planned again")


@tokens_group.command("create")
@click.argument("name")
@click.option(
    "--scope",
    required=True,
    type=click.Choice([scope.value for scope in tokens.SCOPES]),
    help="read: every GET; submit: also tasks, users, previews; admin: everything.",
)
def tokens_create(name: str, scope: str) -> None:
    """Create a token NAME and print it, this once: only its digest is stored."""
    with _refusals_as_errors():
        token = tokens.create(name, scope)
    click.echo(f"token {name} created with scope {scope}; it is shown only now:", err=True)
    click.echo(token)


@tokens_group.command("list")
def tokens_list() -> None:
    """Print each token's name, scope, creation and last use (never the token)."""
    rows = [("name", "scope", "created", "last used")]
    rows += [
        (row.name, row.scope, _moment(row.created_at), _moment(row.last_used_at) or "never")
        for row in tokens.listed()
    ]
    _echo_table(rows)


@tokens_group.command("revoke")
@click.argument("name")
def tokens_revoke(name: str) -> None:
    """Delete token NAME: the next request that presents it is refused."""
    with _refusals_as_errors():
        tokens.revoke(name)
    click.echo(f"token {name} revoked")


def _moment(moment: datetime | None) -> str:
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC" if moment else ""


def _options(assignments: tuple[str, ...]) -> dict[str, str]:
    """KEY=VALUE pairs as text; the processor's schema converts what it needs."""
    options = {}
    for assignment in assignments:
        key, equals, value = assignment.partition("=")
        if not (key and equals):
            raise click.BadParameter(f"{assignment!r} is not KEY=VALUE", param_hint="--option")
        options[key] = value
    return options


@contextmanager
def _refusals_as_errors() -> Iterator[None]:
    """What the API answers with a 4xx, said in one line, the command failing."""
    try:
        yield
    except ValidationError as refusal:
        raise click.ClickException(_described(refusal.messages)) from None
    except IntegrityError as error:
        db.session.rollback()
        conflict = unique_violation(error)
        if conflict is None:
            raise
        raise click.ClickException(conflict.message) from None
    except DomainError as refusal:
        details = f": {_described(refusal.errors)}" if refusal.errors else ""
        raise click.ClickException(f"{refusal.message}{details}") from None


def _described(errors, where: str = "") -> str:
    """Marshmallow's nested messages as `field: message; other.field: message`."""
    if isinstance(errors, dict):
        return "; ".join(
            _described(inner, f"{where}.{key}" if where else str(key))
            for key, inner in errors.items()
        )
    messages = errors if isinstance(errors, list) else [errors]
    return f"{where}: {' '.join(str(message) for message in messages)}"


class _Progress:
    """A binary stream that advances a progress bar as it is read."""

    def __init__(self, stream, bar):
        self._stream, self._bar = stream, bar

    def read(self, size: int = -1) -> bytes:
        block = self._stream.read(size)
        self._bar.update(len(block))
        return block


def _size_of(source) -> int | None:
    try:
        return source.seek(0, 2) - source.seek(0)
    except (OSError, ValueError):
        return None


def init_app(app) -> None:
    app.cli.add_command(worker_command)
    app.cli.add_command(scheduler_command)
    app.cli.add_command(plan_group)
    app.cli.add_command(tasks_group)
    app.cli.add_command(settings_group)
    app.cli.add_command(limits_group)
    app.cli.add_command(tokens_group)
