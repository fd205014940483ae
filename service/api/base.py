"""What every blueprint of the API shares: the Api and Blueprint classes, the JSON parser,
the content-type check and the OpenAPI component names."""

from __future__ import annotations

from apispec.ext.marshmallow.common import resolve_schema_cls
from flask import request
from flask_smorest import Api, Blueprint
from webargs.flaskparser import FlaskParser
from werkzeug.exceptions import BadRequest, HTTPException, UnsupportedMediaType


class ServiceApi(Api):
    """Api whose errors always carry a message, including werkzeug's own."""

    def handle_http_exception(self, error: HTTPException):
        payload, code, headers = super().handle_http_exception(error)
        if "message" not in payload and error.description:
            payload["message"] = error.description
        return payload, code, headers


class _JsonParser(FlaskParser):
    # json.loads raises more than JSONDecodeError on hostile input (too deep a nesting,
    # an integer of thousands of digits); each of those is the client's error, not ours.
    def _raw_load_json(self, req):
        try:
            return super()._raw_load_json(req)
        except (ValueError, RecursionError) as exc:
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise BadRequest(f"Invalid JSON body: {reason}") from None


class ServiceBlueprint(Blueprint):
    ARGUMENTS_PARSER = _JsonParser()

    @staticmethod
    def _make_pagination_metadata(page: int, page_size: int, item_count: int) -> dict:
        """flask-smorest's X-Pagination header, without the marshmallow schema that it
        builds for every page only to copy these integers."""
        if item_count == 0:
            return {"total": 0, "total_pages": 0}
        last = (item_count - 1) // page_size + 1
        header = {"total": item_count, "total_pages": last, "first_page": 1, "last_page": last}
        if page <= last:
            header["page"] = page
            if page > 1:
                header["previous_page"] = page - 1
            if page < last:
                header["next_page"] = page + 1
        return header


def require_content_type(*allowed: str) -> None:
    """Refuse a body of any other media type with 415, before it is parsed."""
    if request.method in ("POST", "PUT", "PATCH") and request.mimetype not in allowed:
        given = request.mimetype or "none"
        raise UnsupportedMediaType(f"Content-Type must be {' or '.join(allowed)}; got {given}")


def schema_name(schema) -> str:
    """OpenAPI component names; a partial (PATCH) schema gets a name of its own."""
    cls = resolve_schema_cls(schema)
    name = cls.__name__.removesuffix("Schema")
    if getattr(schema, "partial", False) is True:
        name += "Patch"
    return name
