"""The operator's pages in HTML: the plan as a grid of slots, and one slot's IDs.

A plain Flask blueprint, not part of the JSON API: the OpenAPI document describes only
the API. API_TOKEN guards these pages as it guards the API (a browser sends it as the
password of HTTP Basic).
"""

from __future__ import annotations

from datetime import UTC

from flask import Blueprint, render_template
from marshmallow import ValidationError
from webargs.flaskparser import parser
from werkzeug.routing import BaseConverter
from werkzeug.routing import ValidationError as NotThisRule

from service.web import plan_overview
from service.web.schemas import PageQuerySchema, moment

blp = Blueprint("pages", __name__)

# The plan page reloads itself this often, so a screen left open follows the slots.
REFRESH_SECONDS = 10


class SlotConverter(BaseConverter):
    """A slot's start in a path, ISO 8601 (UTC unless it names a zone), as in
    2026-11-29T15:07:00Z; anything else is simply not found."""

    start = moment("a slot's start")

    def to_python(self, value: str):
        try:
            return self.start.deserialize(value).astimezone(UTC)
        except ValidationError:
            raise NotThisRule() from None

    def to_url(self, value) -> str:
        return f"{value.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"


@blp.get("/plan")
def plan():
    """A limit's current and next hour of slots (`?limit=`, default: the default limit),
    and the slot jobs rq-scheduler holds."""
    query = parser.parse(PageQuerySchema(), location="query")
    overview = plan_overview.current_plan(limit_name=query.get("limit"))
    return render_template("plan.html", refresh_seconds=REFRESH_SECONDS, **overview)


@blp.get("/plan/slots/<slot:slot>")
def slot_ids(slot):
    """One slot's IDs with task, status, attempts and error, a page at a time."""
    query = parser.parse(PageQuerySchema(), location="query")
    overview = plan_overview.slot_ids(slot, query["page"], query.get("limit"))
    return render_template("slot.html", **overview)


def init_app(app) -> None:
    app.url_map.converters["slot"] = SlotConverter
    app.register_blueprint(blp)
