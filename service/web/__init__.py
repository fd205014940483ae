"""The web layer: the HTTP API (one flask-smorest blueprint per resource, in
resources/), the operator's pages, rq-dashboard, the token check (auth.py), and the one
place where domain errors become HTTP answers (errors.py)."""

from __future__ import annotations

import rq_dashboard
from flask import Blueprint, current_app, g, request
from flask_smorest import abort
from swagger_ui_bundle import swagger_ui_path
from werkzeug.routing import IntegerConverter

from service.core.extensions import db
from service.core.models import MAX_ID
from service.web import auth, errors, pages
from service.web.base import SchemaRulesPlugin, ServiceApi, schema_name
from service.web.resources import health, limits, metrics, root, slots, tasks, users

api = ServiceApi()

# The blueprints whose GETs read PostgreSQL.
DATA_BLUEPRINTS = {"users", "tasks", "slots"}


class IdConverter(IntegerConverter):
    """A positive 64-bit ID in a path; anything else is simply not found."""

    def __init__(self, map, *args, **kwargs):
        super().__init__(map, min=1, max=MAX_ID)


def init_app(app) -> None:
    api.init_app(
        app,
        spec_kwargs={
            "marshmallow_plugin": SchemaRulesPlugin(schema_name_resolver=schema_name),
            "extra_plugins": [auth.ScopesPlugin()],
        },
    )
    errors.init_app(app, api)
    app.url_map.converters["id"] = IdConverter
    app.url_map.converters["limit"] = limits.LimitNameConverter
    api.register_converter(limits.LimitNameConverter, limits.limit_name_schema)
    api.register_blueprint(root.blp)
    api.register_blueprint(users.blp)
    api.register_blueprint(tasks.blp)
    api.register_blueprint(slots.blp)
    api.register_blueprint(limits.blp)
    api.register_blueprint(health.blp)
    api.register_blueprint(metrics.blp)
    if app.config["SERVED_HOSTS"]:
        app.before_request(_served_hosts_only)
    app.before_request(_no_cross_site_changes)
    # Always: tokens stored while the process runs close an open deployment at once.
    app.before_request(auth.require_token)
    app.before_request(_read_without_transaction)
    app.teardown_request(_end_read)
    pages.init_app(app)
    _serve_swagger_ui(app)
    _mount_dashboard(app, api)


def _read_without_transaction() -> None:
    """Run a GET's statements outside a transaction.

    Under READ COMMITTED each statement reads its own snapshot whether a transaction
    wraps it or not, so for a read the transaction buys nothing but two more round trips
    (BEGIN, ROLLBACK), each a wait for the GIL again under load. A session already in a
    transaction (a test's own context) is left as it is.
    """
    if request.method not in ("GET", "HEAD") or request.blueprint not in DATA_BLUEPRINTS:
        return
    if not db.session().in_transaction():
        db.session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
        g.read_without_transaction = True


def _end_read(error) -> None:
    # The session may outlive the request (a context pushed around it): whatever runs
    # in it next gets a transaction again.
    if g.pop("read_without_transaction", False):
        db.session.close()


# Methods that change something; and the one rq-dashboard action a GET may take.
CHANGING_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
CHANGING_GETS = {"rq_dashboard.requeue_all"}
# What a browser says of a request that a page of another site made.
FOREIGN_SITES = {"cross-site", "same-site"}


def _no_cross_site_changes() -> None:
    """A page elsewhere can make a browser send a form or a text body here, with the
    credentials the browser keeps for this service (HTTP Basic) or none at all (an open
    `make run`): a change is taken only from this service's own pages or from clients
    that are not browsers (which send neither `Origin` nor `Sec-Fetch-Site`)."""
    changing = request.method in CHANGING_METHODS or request.endpoint in CHANGING_GETS
    if not changing:
        return
    site = request.headers.get("Sec-Fetch-Site")
    origin = request.headers.get("Origin")
    foreign_origin = origin is not None and origin != request.host_url.rstrip("/")
    if site in FOREIGN_SITES or (site is None and foreign_origin):
        abort(
            403,
            message="a change sent by a browser must come from this service's own pages "
            "(its Origin or Sec-Fetch-Site says another site sent it)",
        )


def _served_hosts_only() -> None:
    """A page elsewhere may point a name it controls at this address (DNS rebinding):
    the Host header then names it, and the request is refused before it reads anything."""
    served = current_app.config["SERVED_HOSTS"]
    host = _host_name(request.host)
    if host not in served:
        abort(400, message=f"this service answers for {', '.join(sorted(served))}, not {host!r}")


def _host_name(host: str) -> str:
    """The name in a Host header, without its port (an IPv6 address without brackets)."""
    if host.startswith("["):
        return host[1 : host.find("]")].lower()
    return host.rpartition(":")[0].lower() if host.count(":") == 1 else host.lower()


def _serve_swagger_ui(app) -> None:
    # From an installed package rather than a CDN: /docs renders on a machine that
    # reaches no internet, as many operators' do.
    assets = Blueprint(
        "swagger_ui", __name__, static_folder=str(swagger_ui_path), static_url_path="/docs/assets"
    )
    app.register_blueprint(assets)


def _mount_dashboard(app, api) -> None:
    app.config["RQ_DASHBOARD_REDIS_URL"] = app.config["REDIS_URL"]
    rq_dashboard.web.setup_rq_connection(app)
    app.register_blueprint(rq_dashboard.blueprint, url_prefix="/rq")
