"""Alembic environment, driven by Flask-Migrate inside the app context.

Migrations run while the service keeps reading and writing, so each revision commits in a
transaction of its own (its locks are held for that revision only), on a connection with
`lock_timeout` and `statement_timeout` set: a revision that waits for a lock gives up after
`lock_timeout` instead of queueing the service's statements behind it. The upgrade is then
tried again, from the first revision not yet recorded, a few times with a short backoff.

The settings, from the environment, in PostgreSQL's units:

- MIGRATION_LOCK_TIMEOUT (default 1s): the longest wait for a lock of any statement.
- MIGRATION_STATEMENT_TIMEOUT (default 30min): the longest any statement may take.
- MIGRATION_LOCK_RETRIES (default 4): how many times a lock timeout is retried.
- MIGRATION_RETRY_DELAY (default 1, in seconds): the first wait before a retry, doubled
  after each.
"""

import logging
import os
import re
import time
from logging.config import fileConfig

from alembic import context
from flask import current_app

from service.core.outages import lock_not_granted
from service.core.partitions import not_a_partition

config = context.config
# Keep the loggers the app configured: alembic's defaults would silence them.
fileConfig(config.config_file_name, disable_existing_loggers=False)
logger = logging.getLogger("alembic.env")

migrate_extension = current_app.extensions["migrate"]
engine = migrate_extension.db.engine
target_metadata = migrate_extension.db.metadata
config.set_main_option(
    "sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%")
)

DURATION = re.compile(r"\d+(\.\d+)?\s*(us|ms|s|min|h|d)?")
RELATIVE = re.compile(r"[+-]\d+$")


def _duration(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip() or default
    if not DURATION.fullmatch(value):
        raise RuntimeError(
            f"{name} must be a PostgreSQL duration such as '500ms', '1s' or '30min', not {value!r}"
        )
    return value


def _number(name: str, default: float, kind: type = float) -> float:
    value = os.environ.get(name, "").strip()
    try:
        number = kind(value) if value else default
    except ValueError:
        number = -1
    if number < 0:
        what = "whole number" if kind is int else "number"
        raise RuntimeError(f"{name} must be a {what} of 0 or more, not {value!r}")
    return number


LOCK_TIMEOUT = _duration("MIGRATION_LOCK_TIMEOUT", "1s")
STATEMENT_TIMEOUT = _duration("MIGRATION_STATEMENT_TIMEOUT", "30min")
LOCK_RETRIES = _number("MIGRATION_LOCK_RETRIES", 4, int)
RETRY_DELAY = _number("MIGRATION_RETRY_DELAY", 1.0)


def skip_empty_autogenerate(context_, revision, directives):
    """`flask db migrate` with no model change writes no empty revision."""
    if getattr(config.cmd_opts, "autogenerate", False) and directives[0].upgrade_ops.is_empty():
        directives[:] = []
        logger.info("No changes in schema detected.")


def _timeouts() -> list[str]:
    # Session settings (SET, not SET LOCAL): they hold for every revision's transaction
    # and across the autocommit blocks that build indexes concurrently.
    return [
        f"SET lock_timeout = '{LOCK_TIMEOUT}'",
        f"SET statement_timeout = '{STATEMENT_TIMEOUT}'",
    ]


def run_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        transaction_per_migration=True,
        include_name=not_a_partition,
    )
    for statement in _timeouts():
        context.execute(statement)
    with context.begin_transaction():
        context.run_migrations()


class LockNotGranted(Exception):
    """A revision could not take a lock within lock_timeout; nothing of it was kept."""

    def __init__(self, error: Exception, stopped_at: str, applied: int):
        super().__init__(str(error))
        self.error = error
        self.stopped_at = stopped_at
        self.applied = applied

    def statement(self) -> str:
        text = " ".join(str(getattr(self.error, "statement", None) or "").split())
        return text if len(text) <= 120 else text[:117] + "..."


def _migrate_once(options: dict) -> None:
    applied = []
    callbacks = options.get("on_version_apply") or []
    if callable(callbacks):
        callbacks = [callbacks]
    options = {
        **options,
        "on_version_apply": [*callbacks, lambda ctx, step, heads, run_args: applied.append(step)],
    }
    with engine.connect() as connection:
        try:
            for statement in _timeouts():
                connection.exec_driver_sql(statement)
            # Not in a transaction when alembic takes the connection, or it would run
            # every revision inside that one.
            connection.commit()
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                include_name=not_a_partition,
                **options,
            )
            with context.begin_transaction():
                context.run_migrations()
        except Exception as error:
            if not lock_not_granted(error):
                raise
            # The failed revision was rolled back; those before it are committed.
            try:
                stopped_at = ", ".join(context.get_context().get_current_heads()) or "base"
            except Exception:  # the connection may be gone too: the message still helps
                stopped_at = "unknown"
            raise LockNotGranted(error, stopped_at, len(applied)) from error
        finally:
            # Its settings must not reach the app's pool: the connection is closed.
            connection.invalidate()


def run_online() -> None:
    options = dict(migrate_extension.configure_args)
    options.setdefault("process_revision_directives", skip_empty_autogenerate)
    # Each revision commits on its own: its locks are held for that revision only, and an
    # upgrade that stops part way keeps the revisions it finished.
    options["transaction_per_migration"] = True
    target = str(context.get_revision_argument() or "")
    attempt = 0
    while True:
        attempt += 1
        try:
            _migrate_once(options)
            return
        except LockNotGranted as failure:
            # A relative target ("+2", "-1") would be counted again from where this attempt
            # stopped: retry it only if this attempt recorded no revision.
            moved = failure.applied and RELATIVE.search(target)
            if attempt > LOCK_RETRIES or moved:
                raise RuntimeError(
                    f"migration stopped at revision {failure.stopped_at}: a lock was not "
                    f"granted within lock_timeout {LOCK_TIMEOUT} after {attempt} "
                    f"attempt{'s' if attempt > 1 else ''} ({failure.statement()}). Another "
                    "session holds a lock on that table (see pg_stat_activity and pg_locks): "
                    "run the upgrade again once it is gone, or allow a longer wait with "
                    "MIGRATION_LOCK_TIMEOUT. The revisions before it are kept."
                ) from failure.error
            delay = RETRY_DELAY * 2 ** (attempt - 1)
            logger.warning(
                "lock not granted within lock_timeout %s (%s); stopped at revision %s, "
                "retry %d of %d in %.1f s",
                LOCK_TIMEOUT,
                failure.statement(),
                failure.stopped_at,
                attempt,
                LOCK_RETRIES,
                delay,
            )
            time.sleep(delay)


if context.is_offline_mode():
    run_offline()
else:
    run_online()
