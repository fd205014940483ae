"""The schema comes from the migrations only, and they match the models."""

import flask_migrate
from alembic.script import ScriptDirectory
from flask import current_app
from sqlalchemy import text

from service.extensions import db
from workers.processors import HTTP_PROCESSOR

from .helpers import at

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
        differences = compare_metadata(MigrationContext.configure(connection), db.metadata)
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
