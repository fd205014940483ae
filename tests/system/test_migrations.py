"""The schema comes from the migrations only, and they match the models; migrations
never hold up the service on a big table, and a downgrade refuses to lose data."""

import dataclasses
import logging
import logging.config
import random
import threading
import time
import uuid
from datetime import timedelta
from urllib.parse import urlsplit, urlunsplit

import flask_migrate
import psycopg
import pytest
import sqlalchemy.exc
from alembic import command
from alembic.script import ScriptDirectory
from flask import Flask, current_app
from sqlalchemy import text

from service.core import partitions
from service.core.config import HTTP_PROCESSOR
from service.core.extensions import db

from ..helpers import at

SLOT = at("2030-01-07 10:00")


def test_db_upgrade_is_idempotent_and_leaves_the_schema_at_head(app, runner):
    result = runner.invoke(args=["db", "upgrade"])
    assert result.exit_code == 0, result.output
    with app.app_context():
        heads = ScriptDirectory.from_config(
            current_app.extensions["migrate"].migrate.get_config()
        ).get_heads()
        version = db.session.execute(text("SELECT version_num FROM alembic_version")).scalar()
    assert [version] == heads


def test_the_models_match_the_migrations(app):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with app.app_context(), db.engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"include_name": partitions.not_a_partition}
        )
        differences = compare_metadata(context, db.metadata)
    assert differences == []


def test_the_default_limit_is_made_from_the_recorded_settings(make_app):
    app = make_app(
        ID_PROCESSOR=HTTP_PROCESSOR,
        PROCESSOR_HTTP_URL="http://crm.internal/users/{id}",
        PROCESSOR_HTTP_TIMEOUT=3.5,
    )
    with app.app_context():
        flask_migrate.downgrade(revision="0007")
        # A deployment as it stood: RPM recorded, a slot holding a pending ID.
        db.session.execute(text("INSERT INTO settings (name, value) VALUES ('RPM', 42)"))
        db.session.execute(text("INSERT INTO slots (slot_start, load) VALUES (:s, 1)"), {"s": SLOT})
        db.session.execute(
            text(
                "INSERT INTO assignments (task_id, position, user_id, slot_start, status) "
                "VALUES (1, 0, 7, :s, 'pending')"
            ),
            {"s": SLOT},
        )
        db.session.commit()
        flask_migrate.upgrade()
        limits = db.session.execute(
            text("SELECT id, name, rpm, processor, options FROM limits")
        ).all()
        moved = db.session.execute(
            text("SELECT (SELECT limit_id FROM slots), (SELECT limit_id FROM assignments)")
        ).one()
        rpm_setting = db.session.execute(
            text("SELECT count(*) FROM settings WHERE name = 'RPM'")
        ).scalar()
    [(limit_id, *default)] = limits
    assert default == [
        "default",
        42,
        HTTP_PROCESSOR,
        {"url": "http://crm.internal/users/{id}", "method": "POST", "timeout": 3.5},
    ]
    assert tuple(moved) == (limit_id, limit_id)
    assert rpm_setting == 0  # the limit's row is the one place RPM is kept


# Migrations run while the service keeps reading and writing: each test below works on a
# database of its own, created for it and dropped after, so the schema the other tests
# share stays at head whatever happens here.

PENDING_INDEX = "ix_assignments_pending_by_slot"
PENDING_INDEX_BUILD = "ix_assignments_pending_by_slot_build"
PENDING_PREDICATE = "((status)::text = 'pending'::text)"
BY_LIMIT = (True, ["limit_id", "slot_start", "task_id", "position"], PENDING_PREDICATE)
BEFORE_LIMITS = (True, ["slot_start", "task_id", "position"], PENDING_PREDICATE)


@dataclasses.dataclass
class Scratch:
    app: Flask
    url: str  # for psycopg, as DATABASE_URL gives it

    def connect(self, **kwargs) -> psycopg.Connection:
        return psycopg.connect(self.url, **kwargs)


@pytest.fixture
def scratch(make_app, base_config):
    """An app on a new, empty database; the database is dropped after the test."""
    name = f"migrations_{uuid.uuid4().hex[:12]}"
    parts = urlsplit(base_config.DATABASE_URL)
    url = urlunsplit(parts._replace(path=f"/{name}"))
    with psycopg.connect(base_config.DATABASE_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        app = make_app(DATABASE_URL=url)
        try:
            yield Scratch(app, url)
        finally:
            with app.app_context():
                db.session.remove()
                db.engine.dispose()
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _alembic_config():
    """What flask_migrate's commands use; alembic's own commands raise what they meet."""
    return current_app.extensions["migrate"].migrate.get_config()


def _head() -> str:
    [head] = ScriptDirectory.from_config(_alembic_config()).get_heads()
    return head


def _version() -> str | None:
    with db.engine.connect() as connection:
        return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


def _index(name: str) -> tuple | None:
    """(valid, columns, predicate) of an index on assignments, or None."""
    with db.engine.connect() as connection:
        row = connection.execute(
            text(
                "SELECT i.indisvalid, "
                "ARRAY(SELECT a.attname::text FROM unnest(i.indkey::int2[]) "
                "WITH ORDINALITY AS k(attnum, n) JOIN pg_attribute a "
                "ON a.attrelid = i.indrelid AND a.attnum = k.attnum ORDER BY k.n), "
                "pg_get_expr(i.indpred, i.indrelid) "
                "FROM pg_index i WHERE i.indexrelid = to_regclass(:name) "
                "AND i.indrelid = to_regclass('assignments')"
            ),
            {"name": name},
        ).one_or_none()
    return None if row is None else tuple(row)


def _index_oid(name: str) -> int | None:
    with db.engine.connect() as connection:
        return connection.execute(text("SELECT to_regclass(:name)::oid"), {"name": name}).scalar()


def _in_thread(app: Flask, work, timeout: float) -> tuple[threading.Thread, dict]:
    """Runs work() in the app's context in a thread, waiting at most `timeout` for it."""
    outcome = {}

    def run():
        started = time.perf_counter()
        try:
            with app.app_context():
                outcome["result"] = work()
        except BaseException as error:  # handed to the test as it came
            outcome["error"] = error
        outcome["seconds"] = time.perf_counter() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    return thread, outcome


# 1,000,000 IDs of 1,000 tasks in 10,000 slots, as revision 0007 holds them.
BIG_ROWS = 1_000_000
IDS_PER_TASK = 1_000
IDS_PER_SLOT = 100


def _fill_at_0007(connection) -> None:
    params = {"base": SLOT, "rows": BIG_ROWS, "per_task": IDS_PER_TASK, "per_slot": IDS_PER_SLOT}
    connection.execute(
        text(
            "INSERT INTO id_tasks (id, task_name, overflow, status, total, duplicates, planned, "
            "done, failed, first_slot, last_slot) "
            "SELECT t, 'big ' || t, 'spread', 'scheduled', :per_task, 0, :per_task, 0, 0, "
            ":base + (t - 1) * (:per_task / :per_slot) * interval '1 minute', "
            ":base + (t * (:per_task / :per_slot) - 1) * interval '1 minute' "
            "FROM generate_series(1, :rows / :per_task) t"
        ),
        params,
    )
    connection.execute(
        text(
            "INSERT INTO slots (slot_start, load) "
            "SELECT :base + m * interval '1 minute', :per_slot "
            "FROM generate_series(0, :rows / :per_slot - 1) m"
        ),
        params,
    )
    # Six in ten pending, one running, two done, one failed.
    connection.execute(
        text(
            "INSERT INTO assignments (task_id, position, user_id, slot_start, status, attempts, "
            "claimed_at, claimed_by, finished_at, error) "
            "SELECT n / :per_task + 1, n % :per_task, n + 1, "
            ":base + (n / :per_slot) * interval '1 minute', s.status, "
            "CASE WHEN s.status = 'pending' THEN 0 ELSE 1 END, "
            "CASE WHEN s.status = 'running' THEN now() END, "
            "CASE WHEN s.status = 'running' THEN 1 END, "
            "CASE WHEN s.status IN ('done', 'failed') THEN now() END, "
            "CASE WHEN s.status = 'failed' THEN 'HTTP 503' END "
            "FROM generate_series(0, :rows - 1) n, LATERAL (SELECT CASE "
            "WHEN n % 10 < 6 THEN 'pending' WHEN n % 10 = 6 THEN 'running' "
            "WHEN n % 10 < 9 THEN 'done' ELSE 'failed' END AS status) s"
        ),
        params,
    )


DEFAULT_LIMIT = "(SELECT id FROM limits WHERE name = 'default')"


class Traffic(threading.Thread):
    """The service's short statements on assignments, on a connection of their own, each
    timed: read a slot's pending IDs, claim one, plan one more."""

    def __init__(self, scratch: Scratch):
        super().__init__(daemon=True)
        self.scratch = scratch
        self.durations: list[tuple[float, str]] = []
        self.errors: list[str] = []
        self.running = threading.Event()
        self.stopping = threading.Event()

    def timed(self, connection, statement: str, params: tuple = ()):
        started = time.perf_counter()
        try:
            return connection.execute(statement, params)
        finally:
            self.durations.append((time.perf_counter() - started, statement.split()[0]))

    def run(self):
        rng = random.Random(8)
        planned = 0
        by_limit = False  # from 0008 on, as the code of then, by limit
        try:
            with self.scratch.connect(autocommit=True) as connection:
                connection.execute("SET statement_timeout = '30s'")
                while not self.stopping.is_set():
                    slot = SLOT + timedelta(minutes=rng.randrange(BIG_ROWS // IDS_PER_SLOT))
                    of_limit = f"limit_id = {DEFAULT_LIMIT}" if by_limit else "true"
                    pending = self.timed(
                        connection,
                        "SELECT task_id, position FROM assignments WHERE status = 'pending' "
                        f"AND {of_limit} AND slot_start = %s ORDER BY task_id, position LIMIT 10",
                        (slot,),
                    ).fetchall()
                    if pending:
                        self.timed(
                            connection,
                            "UPDATE assignments SET status = 'running', claimed_at = now(), "
                            "claimed_by = 2 WHERE task_id = %s AND position = %s "
                            "AND status = 'pending'",
                            pending[0],
                        )
                    planned += 1
                    row = (rng.randrange(1, BIG_ROWS // IDS_PER_TASK + 1), 10**6 + planned, slot)
                    if not by_limit:
                        try:
                            self.timed(
                                connection,
                                "INSERT INTO assignments (task_id, position, user_id, "
                                "slot_start, status) VALUES (%s, %s, 1, %s, 'pending')",
                                row,
                            )
                        except psycopg.errors.NotNullViolation:
                            by_limit = True
                    if by_limit:
                        self.timed(
                            connection,
                            "INSERT INTO assignments (task_id, position, user_id, slot_start, "
                            f"status, limit_id) VALUES (%s, %s, 1, %s, 'pending', {DEFAULT_LIMIT})",
                            row,
                        )
                    self.running.set()
        except Exception as error:  # reported by the test
            self.errors.append(repr(error))
        finally:
            self.running.set()


LAST_WITHOUT_REWRITE = "0011"


def test_an_upgrade_of_a_million_ids_never_holds_up_the_service_for_a_second(scratch):
    with scratch.app.app_context():
        flask_migrate.upgrade(revision="0007")
        started = time.perf_counter()
        with db.engine.begin() as connection:
            _fill_at_0007(connection)
        with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("VACUUM ANALYZE"))
        filled = time.perf_counter() - started
        traffic = Traffic(scratch)
        traffic.start()
        try:
            assert traffic.running.wait(30)
            before = len(traffic.durations)
            started = time.perf_counter()
            # Up to the last revision that promises it: 0012 rewrites assignments, holding
            # it for its whole run (docs/upgrading.md, "Big tables").
            flask_migrate.upgrade(revision=LAST_WITHOUT_REWRITE)
            upgrade_seconds = time.perf_counter() - started
            during = len(traffic.durations) - before
            time.sleep(0.2)  # and it still works on the new schema
        finally:
            traffic.stopping.set()
            traffic.join(60)
        version, index = _version(), _index(PENDING_INDEX)
        started = time.perf_counter()
        flask_migrate.upgrade(revision="0012")
        rewrite_seconds = time.perf_counter() - started
        widened = _limit_columns()
        # 0018 rewrites assignments again, into its days' partitions.
        flask_migrate.upgrade(revision="0017")
        rows_before = db.session.scalar(text("SELECT count(*) FROM assignments"))
        db.session.commit()
        started = time.perf_counter()
        flask_migrate.upgrade(revision="0018")
        partition_seconds = time.perf_counter() - started
        rows_after = db.session.scalar(
            text("SELECT count(*) FROM assignments WHERE tableoid <> 'assignments'::regclass")
        )
        db.session.commit()
    longest, kind = max(traffic.durations)
    print(
        f"\n{BIG_ROWS:,} IDs filled in {filled:.1f} s; upgrade 0007 -> {LAST_WITHOUT_REWRITE} "
        f"took {upgrade_seconds:.1f} s; the other connection ran {during} statements "
        f"meanwhile, the longest ({kind}) {longest * 1000:.0f} ms; 0012 then rewrote the "
        f"tables in {rewrite_seconds:.1f} s; 0018 moved {rows_after:,} rows into their days' "
        f"partitions in {partition_seconds:.1f} s"
    )
    assert rows_after == rows_before
    assert traffic.errors == []
    assert version == LAST_WITHOUT_REWRITE
    assert index == BY_LIMIT
    assert widened == INTEGERS
    # It kept its pace alongside: behind a rebuild of the index, it makes a few dozen.
    assert during > 200
    assert longest < 1.0


def test_0009_builds_the_index_by_limit_concurrently_unless_0008_built_it(scratch):
    with scratch.app.app_context():
        flask_migrate.upgrade(revision="0008")
        assert _index(PENDING_INDEX) == BEFORE_LIMITS  # 0008 leaves it to 0009
        with db.engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO assignments (limit_id, task_id, position, user_id, slot_start, "
                    "status) SELECT 1, 1, p, p, :s, 'pending' FROM generate_series(0, 99) p"
                ),
                {"s": SLOT},
            )
        # An attempt that failed half way leaves an INVALID index under the build name.
        with (
            scratch.connect(autocommit=True) as connection,
            pytest.raises(psycopg.errors.UniqueViolation),
        ):
            connection.execute(
                f"CREATE UNIQUE INDEX CONCURRENTLY {PENDING_INDEX_BUILD} "
                "ON assignments (slot_start)"
            )
        assert _index(PENDING_INDEX_BUILD)[0] is False

        flask_migrate.upgrade(revision="0009")
        assert _version() == "0009"
        assert _index(PENDING_INDEX) == BY_LIMIT
        assert _index(PENDING_INDEX_BUILD) is None

        # Back before 0008: the index it had, built concurrently.
        flask_migrate.downgrade(revision="0007")
        assert _index(PENDING_INDEX) == BEFORE_LIMITS
        assert _index(PENDING_INDEX_BUILD) is None

        # A deployment that ran 0008 when 0008 built the index by limit, in its transaction.
        flask_migrate.upgrade(revision="0008")
        with db.engine.begin() as connection:
            connection.execute(text(f"DROP INDEX {PENDING_INDEX}"))
            connection.execute(
                text(
                    f"CREATE INDEX {PENDING_INDEX} ON assignments "
                    "(limit_id, slot_start, task_id, position) WHERE status = 'pending'"
                )
            )
        built = _index_oid(PENDING_INDEX)
        flask_migrate.upgrade(revision="0009")
        assert _version() == "0009"
        assert _index_oid(PENDING_INDEX) == built  # the same index, not built again
        assert _index(PENDING_INDEX) == BY_LIMIT
        assert _index(PENDING_INDEX_BUILD) is None


def _plan_state() -> tuple:
    with db.engine.connect() as connection:
        return tuple(
            tuple(rows)
            for rows in (
                connection.execute(text("SELECT name FROM limits ORDER BY name")).scalars(),
                connection.execute(
                    text("SELECT limit_id, slot_start, load FROM slots ORDER BY 1, 2")
                ).all(),
                connection.execute(
                    text(
                        "SELECT limit_id, status, count(*) FROM assignments "
                        "GROUP BY 1, 2 ORDER BY 1, 2"
                    )
                ).all(),
            )
        )


def test_a_downgrade_below_0008_refuses_while_other_limits_hold_pending_ids(scratch):
    app = scratch.app
    with app.app_context():
        flask_migrate.upgrade()
        flask_migrate.downgrade(revision="0008")
        with db.engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO limits (name, rpm, processor) VALUES "
                    "('crm', 60, :p), ('billing', 30, :p)"
                ),
                {"p": HTTP_PROCESSOR},
            )
            connection.execute(
                text("INSERT INTO slots (limit_id, slot_start, load) SELECT id, :s, 2 FROM limits"),
                {"s": SLOT},
            )
            # crm: two pending, one done; billing: one pending; default: one pending.
            connection.execute(
                text(
                    "INSERT INTO assignments (limit_id, task_id, position, user_id, slot_start, "
                    "status) SELECT l.id, 1, row_number() OVER (), 7, :s, v.status "
                    "FROM (VALUES ('crm', 'pending'), ('crm', 'pending'), ('crm', 'done'), "
                    "('billing', 'pending'), ('default', 'pending')) v(name, status) "
                    "JOIN limits l USING (name)"
                ),
                {"s": SLOT},
            )
        before = _plan_state()

        with pytest.raises(RuntimeError) as refused:
            command.downgrade(_alembic_config(), "0007")
        message = str(refused.value)
        assert "3 IDs are pending in limits other than default: crm (2), billing (1)" in message
        assert _version() == "0008"
        assert _plan_state() == before
        assert _index(PENDING_INDEX_BUILD) is None  # refused before building anything

        result = app.test_cli_runner().invoke(args=["db", "downgrade", "0007"])
        assert result.exit_code == 1
        assert "Error: downgrade below 0008 refused: 3 IDs are pending" in result.output
        assert _version() == "0008"

        # Once they are sent, it proceeds as it always did.
        with db.engine.begin() as connection:
            connection.execute(
                text(
                    "UPDATE assignments SET status = 'done' WHERE limit_id <> "
                    "(SELECT id FROM limits WHERE name = 'default')"
                )
            )
        flask_migrate.downgrade(revision="0007")
        assert _version() == "0007"
        assert _index(PENDING_INDEX) == BEFORE_LIMITS
        with db.engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM slots")).scalar() == 1
            assert connection.execute(text("SELECT count(*) FROM assignments")).scalar() == 5
        flask_migrate.upgrade()
        assert _version() == _head()


def test_a_downgrade_below_0013_refuses_while_tokens_exist(scratch):
    app = scratch.app
    runner = app.test_cli_runner()
    with app.app_context():
        flask_migrate.upgrade()
        for name, scope in (("ops", "admin"), ("ci", "read")):
            created = runner.invoke(args=["tokens", "create", name, "--scope", scope])
            assert created.exit_code == 0, created.output

        result = runner.invoke(args=["db", "downgrade", "0012"])
        assert result.exit_code == 1
        assert "Error: downgrade below 0013 refused: 2 API tokens exist: ci, ops." in result.output
        assert _version() == "0013"
        listed = runner.invoke(args=["tokens", "list"]).output.splitlines()
        assert [line.split()[0] for line in listed[1:]] == ["ci", "ops"]

        # Once they are revoked, it proceeds.
        for name in ("ci", "ops"):
            assert runner.invoke(args=["tokens", "revoke", name]).exit_code == 0
        flask_migrate.downgrade(revision="0012")
        assert _version() == "0012"
        with db.engine.connect() as connection:
            assert connection.execute(text("SELECT to_regclass('api_tokens')")).scalar() is None
        flask_migrate.upgrade()
        assert _version() == _head()


def test_a_downgrade_below_0014_refuses_while_a_task_is_refused(scratch):
    app = scratch.app
    runner = app.test_cli_runner()
    with app.app_context():
        flask_migrate.upgrade()
        tasks = "/celery_ids_tasks/"
        refused = app.test_client().post(tasks, json={"task_name": "t", "ids": [1]}).json["id"]
        db.session.execute(
            text("UPDATE id_tasks SET status = 'refused', error = 'not planned: ...'")
        )
        db.session.commit()

        result = runner.invoke(args=["db", "downgrade", "0013"])
        assert result.exit_code == 1
        assert f"Error: downgrade below 0014 refused: tasks {refused} are refused" in result.output
        assert _version() == "0014"

        # Once it is cancelled, it proceeds: no task holds the status or a reason.
        flask_migrate.upgrade()
        assert app.test_client().delete(f"{tasks}{refused}/").status_code == 204
        db.session.remove()  # the requests ran in this context: its session reads no more
        flask_migrate.downgrade(revision="0013")
        assert _version() == "0013"
        with db.engine.connect() as connection:
            columns = connection.execute(
                text(
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_name = 'id_tasks'"
                )
            ).scalars()
            assert "error" not in set(columns)
        flask_migrate.upgrade()
        assert _version() == _head()


def _limit_columns() -> dict[str, str]:
    """The type of limits.id and of every column that holds a limit's id."""
    with db.engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT table_name || '.' || column_name, data_type "
                "FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND (column_name = 'limit_id' "
                "OR (table_name = 'limits' AND column_name = 'id'))"
            )
        ).all()
    return dict(rows)


def _limit_sequence() -> tuple:
    with db.engine.connect() as connection:
        return tuple(
            connection.execute(
                text(
                    "SELECT data_type::text, max_value, last_value FROM pg_sequences "
                    "WHERE schemaname = current_schema() AND sequencename = 'limits_id_seq'"
                )
            ).one()
        )


def _rows_of_limits() -> tuple:
    with db.engine.connect() as connection:
        return tuple(
            tuple(connection.execute(text(query)).all())
            for query in (
                "SELECT id, name FROM limits ORDER BY id",
                "SELECT id, limit_id FROM id_tasks ORDER BY id",
                "SELECT limit_id, slot_start, load FROM slots ORDER BY 1, 2",
                "SELECT task_id, position, limit_id, status FROM assignments ORDER BY 1, 2",
            )
        )


def _fill_limits_at_0011(connection) -> None:
    """Two limits, crm the last a SMALLINT allows, with a task, slots and IDs each."""
    connection.execute(text("SELECT setval(pg_get_serial_sequence('limits', 'id'), 32766)"))
    connection.execute(
        text("INSERT INTO limits (name, rpm, processor) VALUES ('crm', 60, :p)"),
        {"p": HTTP_PROCESSOR},
    )
    connection.execute(
        text(
            "INSERT INTO id_tasks (id, task_name, overflow, status, total, duplicates, planned, "
            "done, failed, limit_id) SELECT l.id, l.name, 'spread', 'scheduled', 2, 0, 2, 0, 0, "
            "l.id FROM limits l"
        )
    )
    connection.execute(
        text(
            "INSERT INTO slots (limit_id, slot_start, load) "
            "SELECT l.id, :s + m * interval '1 minute', 1 FROM limits l, generate_series(0, 1) m"
        ),
        {"s": SLOT},
    )
    connection.execute(
        text(
            "INSERT INTO assignments (task_id, position, user_id, limit_id, slot_start, status) "
            "SELECT l.id, m, 100 + m, l.id, :s + m * interval '1 minute', 'pending' "
            "FROM limits l, generate_series(0, 1) m"
        ),
        {"s": SLOT},
    )


INTEGERS = {
    "limits.id": "integer",
    "id_tasks.limit_id": "integer",
    "slots.limit_id": "integer",
    "assignments.limit_id": "integer",
}
SMALLINTS = dict.fromkeys(INTEGERS, "smallint")


def test_0012_widens_limit_ids_and_their_sequence_keeping_every_row(scratch):
    with scratch.app.app_context():
        flask_migrate.upgrade(revision="0011")
        assert _limit_columns() == SMALLINTS
        with db.engine.begin() as connection:
            _fill_limits_at_0011(connection)
            # The next limit is one a SMALLINT cannot number.
            with pytest.raises(sqlalchemy.exc.DataError), connection.begin_nested():
                connection.execute(
                    text("INSERT INTO limits (name, rpm, processor) VALUES ('next', 1, 'x:y')")
                )
        before = _rows_of_limits()

        flask_migrate.upgrade(revision="0012")
        assert _version() == "0012"
        assert _limit_columns() == INTEGERS
        assert _limit_sequence() == ("integer", 2147483647, 32767)
        assert _rows_of_limits() == before
        with db.engine.begin() as connection:
            created = connection.execute(
                text(
                    "INSERT INTO limits (name, rpm, processor) VALUES ('next', 1, 'x:y') "
                    "RETURNING id"
                )
            ).scalar()
            # Its keys hold: the slots' primary key and the foreign keys to limits.
            with pytest.raises(sqlalchemy.exc.IntegrityError), connection.begin_nested():
                connection.execute(
                    text("INSERT INTO slots (limit_id, slot_start) VALUES (:l, :s)"),
                    {"l": 32767, "s": SLOT},
                )
            with pytest.raises(sqlalchemy.exc.IntegrityError), connection.begin_nested():
                connection.execute(
                    text("INSERT INTO slots (limit_id, slot_start) VALUES (99999, :s)"),
                    {"s": SLOT},
                )
        assert created == 32768
        assert _index(PENDING_INDEX) == BY_LIMIT


def test_a_downgrade_below_0012_refuses_while_an_id_is_beyond_a_smallint(scratch):
    app = scratch.app
    with app.app_context():
        flask_migrate.upgrade(revision="0011")
        with db.engine.begin() as connection:
            _fill_limits_at_0011(connection)
        flask_migrate.upgrade(revision="0012")
        with db.engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO limits (name, rpm, processor) VALUES ('billing', 30, :p), "
                    "('mail', 30, :p)"
                ),
                {"p": HTTP_PROCESSOR},
            )
            # An ID planned for a limit deleted since: still recorded under its id.
            connection.execute(
                text(
                    "INSERT INTO assignments (task_id, position, user_id, limit_id, slot_start, "
                    "status) VALUES (9, 0, 9, 40000, :s, 'done')"
                ),
                {"s": SLOT},
            )
        before = _rows_of_limits()

        with pytest.raises(RuntimeError) as refused:
            command.downgrade(_alembic_config(), "0011")
        message = str(refused.value)
        assert "downgrade below 0012 refused" in message
        assert "2 limits have a larger one: billing (id 32768), mail (id 32769)" in message
        assert "1 IDs of tasks are recorded under such limits" in message
        assert _version() == "0012"
        assert _limit_columns() == INTEGERS
        assert _rows_of_limits() == before

        result = app.test_cli_runner().invoke(args=["db", "downgrade", "0011"])
        assert result.exit_code == 1
        assert "Error: downgrade below 0012 refused" in result.output

        # Once no id is beyond a SMALLINT, it narrows back; the sequence goes on from the
        # largest id recorded, not from the deleted limits above it.
        with db.engine.begin() as connection:
            connection.execute(text("DELETE FROM limits WHERE id > 32767"))
            connection.execute(text("DELETE FROM assignments WHERE limit_id > 32767"))
        flask_migrate.downgrade(revision="0011")
        assert _version() == "0011"
        assert _limit_columns() == SMALLINTS
        assert _limit_sequence() == ("smallint", 32767, 32767)
        assert _rows_of_limits() == _without_wide(before)
        flask_migrate.upgrade(revision="0012")
        assert _limit_columns() == INTEGERS


def _without_wide(rows: tuple) -> tuple:
    """`_rows_of_limits()` without what lies beyond a SMALLINT."""
    limits_, tasks, slots, assignments = rows
    return (
        tuple(row for row in limits_ if row[0] <= 32767),
        tasks,
        slots,
        tuple(row for row in assignments if row[2] <= 32767),
    )


@pytest.fixture
def short_lock_waits(monkeypatch, caplog):
    """lock_timeout 200 ms, two retries; the retries' log lines in caplog."""
    monkeypatch.setenv("MIGRATION_LOCK_TIMEOUT", "200ms")
    monkeypatch.setenv("MIGRATION_LOCK_RETRIES", "2")
    monkeypatch.setenv("MIGRATION_RETRY_DELAY", "0.2")
    # alembic.ini's logging setup would take caplog's handler off the root logger.
    monkeypatch.setattr(logging.config, "fileConfig", lambda *args, **kwargs: None)
    caplog.set_level(logging.INFO, logger="alembic.env")
    return caplog


def _retries(caplog) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "alembic.env" and "lock not granted" in record.getMessage()
    ]


def test_a_lock_held_past_lock_timeout_is_retried_then_the_upgrade_fails_clearly(
    scratch, short_lock_waits
):
    with scratch.app.app_context():
        flask_migrate.upgrade(revision="0006")
    # A long report on assignments: 0008 cannot alter the table until it ends.
    with scratch.connect() as reader:
        reader.execute("SELECT count(*) FROM assignments")
        thread, outcome = _in_thread(
            scratch.app, lambda: command.upgrade(_alembic_config(), "head"), timeout=20
        )
        waiting = thread.is_alive()
    thread.join(20)
    assert not waiting, "the upgrade waited for the lock"
    error = outcome.get("error")
    assert isinstance(error, RuntimeError), outcome
    message = str(error)
    assert "stopped at revision 0007" in message  # 0007 took no lock the report held
    assert "lock_timeout 200ms after 3 attempts" in message
    assert "ALTER TABLE assignments" in message
    assert len(_retries(short_lock_waits)) == 2
    assert outcome["seconds"] < 10
    with scratch.app.app_context():
        assert _version() == "0007"


def test_an_upgrade_goes_on_once_the_lock_it_waits_for_is_released(scratch, short_lock_waits):
    with scratch.app.app_context():
        flask_migrate.upgrade(revision="0007")
    with scratch.connect() as reader:
        reader.execute("SELECT count(*) FROM assignments")
        release = threading.Timer(0.3, reader.rollback)
        release.start()
        thread, outcome = _in_thread(
            scratch.app, lambda: command.upgrade(_alembic_config(), "head"), timeout=20
        )
        release.join()
    assert not thread.is_alive(), "the upgrade waited for the lock"
    assert "error" not in outcome, outcome
    assert 1 <= len(_retries(short_lock_waits)) <= 2
    with scratch.app.app_context():
        assert _version() == _head()
        assert _index(PENDING_INDEX) == BY_LIMIT
        with db.engine.connect() as connection:
            # The default limit made once, though 0008 ran twice.
            assert connection.execute(text("SELECT count(*) FROM limits")).scalar() == 1
            # The app's own connections keep PostgreSQL's defaults.
            assert connection.execute(text("SHOW lock_timeout")).scalar() == "0"
            assert connection.execute(text("SHOW statement_timeout")).scalar() == "0"


def test_statement_timeout_bounds_a_statement_of_a_migration_too(
    scratch, short_lock_waits, monkeypatch
):
    with scratch.app.app_context():
        flask_migrate.upgrade(revision="0007")
    monkeypatch.setenv("MIGRATION_LOCK_TIMEOUT", "0")  # no lock_timeout at all
    monkeypatch.setenv("MIGRATION_STATEMENT_TIMEOUT", "300ms")
    with scratch.connect() as reader:
        reader.execute("SELECT count(*) FROM assignments")
        thread, outcome = _in_thread(
            scratch.app, lambda: command.upgrade(_alembic_config(), "head"), timeout=20
        )
        waiting = thread.is_alive()
    thread.join(20)
    assert not waiting, "the upgrade waited for the lock"
    assert isinstance(outcome.get("error"), sqlalchemy.exc.OperationalError), outcome
    assert isinstance(outcome["error"].orig, psycopg.errors.QueryCanceled)
    assert _retries(short_lock_waits) == []  # not a lock timeout: not retried
    with scratch.app.app_context():
        assert _version() == "0007"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MIGRATION_LOCK_TIMEOUT", "soon"),
        ("MIGRATION_STATEMENT_TIMEOUT", "1s; DROP TABLE users"),
        ("MIGRATION_LOCK_RETRIES", "-1"),
    ],
)
def test_a_migration_setting_that_is_not_a_duration_or_count_is_refused(
    app, monkeypatch, name, value
):
    monkeypatch.setenv(name, value)
    with app.app_context(), pytest.raises(RuntimeError, match=name):
        command.upgrade(_alembic_config(), "head")


def test_a_downgrade_below_0016_refuses_while_a_limit_holds_a_learned_rate(scratch):
    app = scratch.app
    runner = app.test_cli_runner()
    with app.app_context():
        flask_migrate.upgrade()
        client = app.test_client()
        assert client.post("/limits/", json={"name": "partner", "rpm": 40}).status_code == 201
        db.session.execute(
            text(
                "INSERT INTO learned_rates (limit_id, learned_rpm) "
                "SELECT id, 20 FROM limits WHERE name = 'partner'"
            )
        )
        db.session.commit()

        result = runner.invoke(args=["db", "downgrade", "0015"])
        assert result.exit_code == 1
        assert "Error: downgrade below 0016 refused: limits partner hold learned" in result.output
        assert _version() == "0016"

        # Once it is reset, it proceeds, and the upgrade comes back to a working limit.
        reset = client.patch("/limits/partner/", json={"learned_rpm": None})
        assert (reset.status_code, reset.json["learned_rpm"]) == (200, 40)
        db.session.remove()
        flask_migrate.downgrade(revision="0015")
        assert _version() == "0015"
        with db.engine.connect() as connection:
            assert connection.execute(text("SELECT to_regclass('learned_rates')")).scalar() is None
        flask_migrate.upgrade()
        assert _version() == _head()
        assert client.get("/limits/partner/").json["learned_rpm"] == 40


ASSIGNMENT_COLUMNS = (
    "task_id, position, user_id, limit_id, slot_start, status, attempts, error, "
    "finished_at, claimed_at, claimed_by, retry_at, claimed_until, refusals, replanned_in"
)
ID_STATUSES = ("pending", "running", "done", "failed", "cancelled", "retrying")


def _task_at_0016(connection, created: str, status: str) -> int:
    return connection.execute(
        text(
            "INSERT INTO id_tasks (task_name, limit_id, overflow, status, total, duplicates, "
            "planned, done, failed, date_created) "
            f"VALUES ('t', {DEFAULT_LIMIT}, 'spread', :status, 6, 0, 6, 0, 0, :created) "
            "RETURNING id"
        ),
        {"status": status, "created": created},
    ).scalar()


def _assignment_at_0016(connection, task_id: int, position: int, status: str) -> None:
    connection.execute(
        text(
            f"INSERT INTO assignments ({ASSIGNMENT_COLUMNS}) VALUES (:task, :position, "
            f":position + 100, {DEFAULT_LIMIT}, '2026-11-04 10:00+00', CAST(:status AS text), "
            "1, 'why', CASE WHEN CAST(:status AS text) IN ('done', 'failed') "
            "THEN '2026-11-04 10:00:30+00'::timestamptz END, now(), 3, now(), now(), 2, NULL)"
        ),
        {"task": task_id, "position": position, "status": status},
    )


def _all_assignments(extra: str = "") -> list[tuple]:
    with db.engine.connect() as connection:
        rows = connection.execute(
            text(f"SELECT {ASSIGNMENT_COLUMNS}{extra} FROM assignments ORDER BY task_id, position")
        )
        return [tuple(row) for row in rows]


def test_0018_moves_every_id_into_the_partition_of_its_tasks_day_and_back(scratch):
    with scratch.app.app_context():
        flask_migrate.upgrade(revision="0016")
        with db.engine.begin() as connection:
            late = _task_at_0016(connection, "2026-11-02 23:30+00", "running")
            early = _task_at_0016(connection, "2026-11-03 00:10+00", "done")
            for position, status in enumerate(ID_STATUSES):
                _assignment_at_0016(connection, late, position, status)
            for position in range(2):
                _assignment_at_0016(connection, early, position, "done")
            _assignment_at_0016(connection, 10**9, 0, "pending")  # its task is gone
        before = _all_assignments()

        flask_migrate.upgrade()
        after = _all_assignments(", task_day, tableoid::regclass::text")
        with db.engine.connect() as connection:
            finished = dict(connection.execute(text("SELECT id, finished_at FROM id_tasks")).all())
            partitioned = connection.execute(
                text("SELECT relkind FROM pg_class WHERE relname = 'assignments'")
            ).scalar()

        flask_migrate.downgrade(revision="0016")
        back = _all_assignments()

    assert partitioned == "p"
    assert [row[:-2] for row in after] == before
    days = {row[0]: (row[-2].isoformat(), row[-1]) for row in after}
    assert days == {
        late: ("2026-11-02", "assignments_20261102"),
        early: ("2026-11-03", "assignments_20261103"),
        10**9: ("2026-11-04", "assignments_20261104"),
    }
    assert finished[late] is None
    assert finished[early] == at("2026-11-04 10:00:30")
    assert back == before


def test_a_downgrade_below_0017_refuses_while_a_tasks_ids_were_removed(scratch):
    app = scratch.app
    runner = app.test_cli_runner()
    with app.app_context():
        flask_migrate.upgrade()
        with db.engine.begin() as connection:
            task_id = _task_at_0016(connection, "2026-11-02 10:00+00", "done")
            connection.execute(
                text("UPDATE id_tasks SET ids_removed_at = now() WHERE id = :t"), {"t": task_id}
            )
        result = runner.invoke(args=["db", "downgrade", "0016"])
        assert result.exit_code == 1
        assert "downgrade below 0017 refused: 1 tasks had their IDs removed" in result.output
        assert _version() == "0017"  # 0018's downgrade loses nothing: it went on
        with db.engine.begin() as connection:
            connection.execute(text("DELETE FROM id_tasks"))
        flask_migrate.downgrade(revision="0016")
        assert _version() == "0016"
