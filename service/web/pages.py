"""The operator's pages in HTML: the plan as a grid of slots, every limit, one slot's
IDs, one task.

A plain Flask blueprint, not part of the JSON API: the OpenAPI document describes only
the API. The token check guards these pages as it guards the API (scope `read`; a
browser sends the token as the password of HTTP Basic). Their errors are pages too: a
person reads them in a browser.
"""

from __future__ import annotations

from datetime import UTC

from flask import Blueprint, render_template, request
from marshmallow import EXCLUDE, Schema, ValidationError, fields
from marshmallow.validate import OneOf, Range
from webargs.flaskparser import parser
from werkzeug.exceptions import HTTPException, NotFound
from werkzeug.routing import BaseConverter, IntegerConverter
from werkzeug.routing import ValidationError as NotThisRule

from service.core.errors import DomainError
from service.core.models import MAX_ID
from service.web import plan_overview
from service.web.errors import http_error
from service.web.schemas import PageQuerySchema, moment

blp = Blueprint("pages", __name__)

# The plan page reloads itself this often, so a screen left open follows the slots.
REFRESH_SECONDS = 10
# Where webargs says it read a field from; an error page names only the field.
LOCATIONS = {"query", "view_args", "path"}


class SlotConverter(BaseConverter):
    """A slot's start in a path, ISO 8601 (UTC unless it names a zone), as in
    2026-11-29T15:07:00Z; anything else reaches the view as None.

    The router would answer a value refused here with the API's JSON 404; the view's
    own 404 is a page."""

    start = moment("a slot's start")

    def to_python(self, value: str):
        try:
            return self.start.deserialize(value).astimezone(UTC)
        except ValidationError:
            return None

    def to_url(self, value) -> str:
        return f"{value.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"


class TaskIdConverter(IntegerConverter):
    """A task's id in a path; one out of range reaches the view as None, as with slots."""

    def __init__(self, map, *args, **kwargs):
        super().__init__(map, min=1, max=MAX_ID)

    def to_python(self, value: str):
        try:
            return super().to_python(value)
        except NotThisRule:
            return None


class PlanQuerySchema(PageQuerySchema):
    """The plan's limit, and a task whose slots it marks."""

    task = fields.Integer(validate=Range(min=1, max=MAX_ID))


class TaskPageQuerySchema(Schema):
    """The page of a task's failures, and their order."""

    class Meta:
        unknown = EXCLUDE

    page = fields.Integer(load_default=1, validate=Range(min=1))
    order = fields.String(
        load_default=plan_overview.NEWEST,
        validate=OneOf(plan_overview.FAILURE_ORDERS),
    )


def _named(value, what: str):
    """The value a path named, or a 404 saying what the path should have named."""
    if value is None:
        raise NotFound(f"{request.path} names no {what}")
    return value


@blp.get("/plan")
def plan():
    """A limit's current and next hour of slots (`?limit=`, default: the default limit),
    with a task's slots marked (`?task=`), the tasks planned into them, the limit's
    latest failures and the slot jobs rq-scheduler holds."""
    query = parser.parse(PlanQuerySchema(), location="query")
    overview = plan_overview.current_plan(limit_name=query.get("limit"), task_id=query.get("task"))
    return render_template("plan.html", refresh_seconds=REFRESH_SECONDS, **overview)


@blp.get("/plan/limits")
def limits():
    """Every limit at a glance: RPM, paused or not, the current slot's load, its IDs
    pending and where its backlog ends."""
    overview = plan_overview.limits_overview()
    return render_template("limits.html", refresh_seconds=REFRESH_SECONDS, **overview)


@blp.get("/plan/slots/<slot:slot>")
def slot_ids(slot):
    """One slot's IDs with task, status, attempts and error, a page at a time."""
    slot = _named(slot, "slot: a slot is named by its start, as in 2026-11-29T15:07:00Z")
    query = parser.parse(PageQuerySchema(), location="query")
    overview = plan_overview.slot_ids(slot, query["page"], query.get("limit"))
    return render_template("slot.html", **overview)


@blp.get("/plan/tasks/<task_id:task_id>")
def task(task_id):
    """One task: its progress, estimated finish and slots, its failures a page at a time."""
    task_id = _named(task_id, "task: a task is named by its id, as in /plan/tasks/12")
    query = parser.parse(TaskPageQuerySchema(), location="query")
    overview = plan_overview.task_page(task_id, query["page"], query["order"])
    return render_template("task.html", refresh_seconds=REFRESH_SECONDS, **overview)


@blp.get("/plan/<path:rest>")
def no_such_page(rest):
    """Any other path under /plan: a page that says so, rather than the API's JSON 404."""
    raise NotFound(f"there is no page at {request.path}")


@blp.errorhandler(HTTPException)
def error_page(error: HTTPException):
    data = getattr(error, "data", None) or {}
    page = render_template(
        "error.html",
        code=error.code,
        name=error.name,
        message=data.get("message") or error.description,
        reasons=_reasons(data.get("errors") or data.get("messages") or {}),
    )
    # A 401 keeps its WWW-Authenticate, so that the browser still asks for the token.
    return page, error.code, data.get("headers") or {}


@blp.errorhandler(DomainError)
def domain_error_page(error: DomainError):
    return error_page(http_error(error))


def _reasons(errors, path: tuple[str, ...] = ()) -> list[str]:
    """Field errors, nested as marshmallow and webargs give them, as lines of text."""
    if isinstance(errors, dict):
        return [
            line
            for key, value in errors.items()
            for line in _reasons(value, path if key in LOCATIONS else (*path, str(key)))
        ]
    field = ".".join(path)
    messages = errors if isinstance(errors, list) else [errors]
    return [f"{field}: {message}" if field else str(message) for message in messages]


def init_app(app) -> None:
    app.url_map.converters["slot"] = SlotConverter
    app.url_map.converters["task_id"] = TaskIdConverter
    app.register_blueprint(blp)
