"""Slotted ID dispatch: the Flask application factory."""

from __future__ import annotations

from pathlib import Path

from flask import Flask

from service import cli, web
from service.core import logs
from service.core.config import Config
from service.core.extensions import db, init_db, init_redis, migrate
from service.web import access

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"

API_SETTINGS = {
    "API_TITLE": "Slotted ID dispatch",
    "API_VERSION": "1",
    "OPENAPI_VERSION": "3.0.3",
    "OPENAPI_URL_PREFIX": "/",
    "OPENAPI_JSON_PATH": "openapi.json",
    "OPENAPI_SWAGGER_UI_PATH": "/docs",
    # Served by the app itself (_serve_swagger_ui).
    "OPENAPI_SWAGGER_UI_URL": "/docs/assets/",
    # No pool_pre_ping: it costs every request a round trip; extensions.init_db pings
    # outside requests only. The engine's connect arguments come from Config.
    "SQLALCHEMY_TRACK_MODIFICATIONS": False,
    "JSON_SORT_KEYS": False,
}


def create_app(config: Config | None = None) -> Flask:
    config = config or Config.from_env()
    app = Flask(__name__)
    app.config.update(API_SETTINGS)
    app.config.update(config.flask_settings())
    logs.configure(config.LOG_FORMAT)

    # First among the request hooks: the token check may refuse a request, and its
    # answer is logged and carries its request id too.
    access.init_app(app)
    init_db(app)
    migrate.init_app(app, db, directory=str(MIGRATIONS))
    init_redis(app)
    web.init_app(app)
    cli.init_app(app)
    return app
