"""Slotted ID dispatch: the Flask application factory."""

from __future__ import annotations

import logging
from pathlib import Path

import rq_dashboard
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Flask

from . import api as api_package
from . import cli, errors
from .api.base import schema_name
from .config import Config
from .extensions import api, db, init_db, init_redis, migrate

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"

API_SETTINGS = {
    "API_TITLE": "Slotted ID dispatch",
    "API_VERSION": "1",
    "OPENAPI_VERSION": "3.0.3",
    "OPENAPI_URL_PREFIX": "/",
    "OPENAPI_JSON_PATH": "openapi.json",
    "OPENAPI_SWAGGER_UI_PATH": "/docs",
    "OPENAPI_SWAGGER_UI_URL": "https://cdn.jsdelivr.net/npm/swagger-ui-dist/",
    # Statements are never prepared: a generic plan cannot match a bound status to the
    # partial indexes on status that claims and reconcile rely on. No pool_pre_ping: it
    # costs every request a round trip; extensions.init_db pings outside requests only.
    "SQLALCHEMY_ENGINE_OPTIONS": {"connect_args": {"prepare_threshold": None}},
    "SQLALCHEMY_TRACK_MODIFICATIONS": False,
    "JSON_SORT_KEYS": False,
}


def create_app(config: Config | None = None) -> Flask:
    config = config or Config.from_env()
    app = Flask(__name__)
    app.config.update(API_SETTINGS)
    app.config.update(config.flask_settings())
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    init_db(app)
    migrate.init_app(app, db, directory=str(MIGRATIONS))
    init_redis(app)
    api.init_app(
        app,
        spec_kwargs={"marshmallow_plugin": MarshmallowPlugin(schema_name_resolver=schema_name)},
    )
    errors.init_app(app, api)
    api_package.init_app(app, api)
    _mount_dashboard(app)
    cli.init_app(app)
    return app


def _mount_dashboard(app: Flask) -> None:
    app.config["RQ_DASHBOARD_REDIS_URL"] = app.config["REDIS_URL"]
    rq_dashboard.web.setup_rq_connection(app)
    app.register_blueprint(rq_dashboard.blueprint, url_prefix="/rq")
