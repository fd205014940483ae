"""The schema comes from the migrations only, and they match the models."""

from alembic.script import ScriptDirectory
from flask import current_app
from sqlalchemy import text

from service.extensions import db


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
