"""What every blueprint of the API shares: the Api and Blueprint classes, the JSON parser,
the content-type check and the OpenAPI component names."""

from __future__ import annotations

import json

from apispec.ext.marshmallow import MarshmallowPlugin
from apispec.ext.marshmallow.common import resolve_schema_cls, resolve_schema_instance
from flask import request
from flask_smorest import Api, Blueprint
from flask_smorest.exceptions import NotModified
from webargs.flaskparser import FlaskParser, is_json_request
from werkzeug.exceptions import BadRequest, HTTPException, UnsupportedMediaType
from werkzeug.http import quote_etag

from service.tasks.ids import load_json_with_ids
from service.web import errors
from service.web.schemas import ErrorSchema, TaskSubmitSchema


class ServiceApi(Api):
    """Api whose errors all have one shape (service/web/errors.py: `errors` keyed by field,
    a `message` in words) and the headers werkzeug gives them (a 405's `Allow`, for one)."""

    ERROR_SCHEMA = ErrorSchema

    def handle_http_exception(self, error: HTTPException):
        payload, code, headers = super().handle_http_exception(error)
        errors.shape(payload, error)
        own = {name: value for name, value in error.get_headers() if name != "Content-Type"}
        return payload, code, {**own, **(headers or {})}


class _JsonParser(FlaskParser):
    def load_json(self, req, schema):
        if isinstance(schema, TaskSubmitSchema) and is_json_request(req):
            return _client_json(_task_json, req)
        return super().load_json(req, schema)

    def _raw_load_json(self, req):
        return _client_json(super()._raw_load_json, req)


def _client_json(load, req):
    """What `load` reads of the body; json.loads raises more than JSONDecodeError on
    hostile input (too deep a nesting, an integer of thousands of digits), and each of
    those is the client's error, not ours."""
    try:
        return load(req)
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise BadRequest(f"Invalid JSON body: {reason}") from None


def _task_json(req) -> object:
    """A task's body, which may hold millions of IDs: decoded as webargs decodes a body
    (strict UTF-8), then read with its IDs in an array (load_json_with_ids)."""
    body = req.get_data(cache=False)
    try:
        text = body.decode()
    except UnicodeDecodeError as exc:
        # webargs' words. Its document is the bytes' repr, which has no line break: the
        # position reads the same with an empty one, without making that repr.
        raise json.JSONDecodeError(f"Bytes decoding error : {exc.reason}", "", exc.start) from None
    del body  # neither cached nor kept while the text is read: a body's size less at the peak
    return load_json_with_ids(text)


# X-Pagination as it is really sent: one header, its value a JSON object in a string.
PAGINATION_HEADER_DOC = {
    "description": "pagination as a JSON object: total, total_pages, first_page, "
    "last_page, page, previous_page, next_page (the last two when they exist)",
    "schema": {"type": "string"},
}


class ServiceBlueprint(Blueprint):
    ARGUMENTS_PARSER = _JsonParser()

    def _check_not_modified(self, etag: str) -> None:
        # If-None-Match compares weakly (a proxy that compresses may weaken the tag), and
        # a 304 carries the ETag that the 200 would have (RFC 9110, 13.1.2 and 15.4.5).
        checked = request.method in self.METHODS_CHECKING_NOT_MODIFIED
        if checked and request.if_none_match.contains_weak(etag):
            not_modified = NotModified()
            not_modified.data = {"headers": {"ETag": quote_etag(etag)}}
            raise not_modified

    def _document_pagination_metadata(self, spec, resp_doc):
        resp_doc.setdefault("headers", {})[self.PAGINATION_HEADER_NAME] = PAGINATION_HEADER_DOC

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


# PostgreSQL refuses an OFFSET beyond a bigint; a page that far is simply empty.
MAX_OFFSET = 2**63 - 1


def page_window(pagination_parameters) -> tuple[int, int]:
    """(offset, limit) of the page asked for."""
    return min(pagination_parameters.first_item, MAX_OFFSET), pagination_parameters.page_size


class SchemaRulesPlugin(MarshmallowPlugin):
    """Adds what a schema's `openapi_rules(partial)` states across its fields (which of
    them go together), a rule no single field can document."""

    def schema_helper(self, name, _, schema=None, **kwargs):
        definition = super().schema_helper(name, _, schema=schema, **kwargs)
        instance = resolve_schema_instance(schema)
        rules = getattr(instance, "openapi_rules", None)
        if rules is not None:
            definition.update(rules(getattr(instance, "partial", False) is True))
        return definition


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
