"""Fixtures: the schema built once by the real migrations, each test on empty tables."""

from __future__ import annotations

import dataclasses
import os

import flask_migrate
import pytest
from sqlalchemy import text

from service import create_app
from service.core.config import Config
from service.core.extensions import db, get_redis

from . import servers
from .processes import ROOT

_embedded: list = []


def pytest_configure(config):
    database_url, redis_url, started = servers.resolve(os.environ, ROOT / "var" / "test")
    _embedded.extend(started)
    # Jobs and child processes build their own app from the environment: point it here.
    os.environ["DATABASE_URL"] = database_url
    os.environ["REDIS_URL"] = redis_url
    os.environ.pop("API_TOKEN", None)
    # The tests' own processors may serve a limit too.
    os.environ["PROCESSOR_MODULES"] = "workers.processors,tests.processors"
    # Limits may call the local downstreams (on ports chosen as they start), and name the
    # example hosts that tests write limits for but never call.
    os.environ["DOWNSTREAM_URLS"] = (
        "http://127.0.0.1:*/,http://crm.internal/,https://partner.example/"
    )


def pytest_unconfigure(config):
    for server in reversed(_embedded):
        server.stop()


@pytest.fixture(scope="session")
def base_config() -> Config:
    return Config.from_env()


@pytest.fixture(scope="session")
def app(base_config):
    app = create_app(base_config)
    app.config["TESTING"] = True
    with app.app_context():
        _rebuild_schema()
    return app


def _rebuild_schema() -> None:
    with db.engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    flask_migrate.upgrade()


@pytest.fixture(autouse=True)
def _clean_state(request):
    """Empty tables and an empty Redis database before every test that uses the app."""
    if "app" not in request.fixturenames:
        yield
        return
    app = request.getfixturevalue("app")
    with app.app_context():
        tables = ", ".join(db.metadata.tables)
        with db.engine.begin() as conn:
            conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
        get_redis().flushdb()
    # No app context stays pushed during the test: each request gets its own, as in
    # production, so a failed request cannot leave a broken session to the next one.
    yield


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def make_app(app, base_config):
    """An app on the same servers and schema with some settings changed."""

    def build(**settings):
        variant = create_app(dataclasses.replace(base_config, **settings))
        variant.config["TESTING"] = True
        return variant

    return build


@pytest.fixture
def rpm3(make_app):
    """An app at RPM 3, without pacing or backoff, its context pushed."""
    app = make_app(RPM=3, PACING=False, RETRY_BACKOFF_SECONDS=0)
    with app.app_context():
        yield app


@pytest.fixture
def rpm5(make_app):
    """An app at RPM 5, its context pushed."""
    app = make_app(RPM=5)
    with app.app_context():
        yield app
