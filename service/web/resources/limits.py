"""/limits/: the named downstreams, each with its own RPM, processor and options."""

from flask.views import MethodView
from werkzeug.routing import BaseConverter, ValidationError

from service.limits import services
from service.planning import resume as pausing
from service.web.base import ServiceBlueprint, page_window, require_content_type
from service.web.schemas import (
    LIMIT_NAME_PATTERN,
    MAX_LIMIT_NAME,
    LimitCreateSchema,
    LimitEventSchema,
    LimitReplaceSchema,
    LimitSchema,
    LimitUpdateSchema,
)


class LimitNameConverter(BaseConverter):
    """A limit's name in a path; anything that cannot be one is simply not found."""

    regex = LIMIT_NAME_PATTERN.strip("^$").replace("(", "(?:")

    def to_python(self, value: str) -> str:
        if len(value) > MAX_LIMIT_NAME:
            raise ValidationError()
        return value


def limit_name_schema(converter) -> dict:
    return {"type": "string", "pattern": LIMIT_NAME_PATTERN, "maxLength": MAX_LIMIT_NAME}


blp = ServiceBlueprint(
    "limits", __name__, url_prefix="/limits", description="Limits: named downstreams"
)


@blp.before_request
def _json_bodies_only():
    require_content_type("application/json")


@blp.route("/")
class Limits(MethodView):
    @blp.doc(operationId="list_limits")
    @blp.etag
    @blp.response(200, LimitSchema(many=True))
    def get(self):
        """List the limits by name, with the counts of their IDs"""
        return services.list_limits()

    @blp.doc(operationId="create_limit")
    @blp.arguments(LimitCreateSchema)
    @blp.response(201, LimitSchema)
    @blp.alt_response(409, description="A limit with that name exists")
    def post(self, fields):
        """Create a limit; its processor must be importable and accept its options"""
        return services.create_limit(fields)


@blp.route("/<limit:limit_name>/")
class LimitByName(MethodView):
    @blp.doc(operationId="get_limit")
    @blp.etag
    @blp.response(200, LimitSchema)
    @blp.alt_response(404, response="DEFAULT_ERROR")
    def get(self, limit_name):
        """Read a limit with the counts of its IDs"""
        return services.read_limit(limit_name)

    @blp.doc(operationId="replace_limit")
    @blp.arguments(LimitReplaceSchema)
    @blp.response(200, LimitSchema)
    @blp.alt_response(404, response="DEFAULT_ERROR")
    def put(self, fields, limit_name):
        """Replace a limit's fields; a new RPM applies to planning from then on"""
        return pausing.replace_limit(limit_name, fields)

    @blp.doc(operationId="update_limit")
    @blp.arguments(LimitUpdateSchema(partial=True))
    @blp.response(200, LimitSchema)
    @blp.alt_response(404, response="DEFAULT_ERROR")
    def patch(self, fields, limit_name):
        """Change some of a limit's fields: a new RPM applies to planning from then on;
        `paused` pauses or resumes it; `learned_rpm: null` resets the learned rate"""
        return pausing.update_limit(limit_name, fields)

    @blp.doc(operationId="delete_limit")
    @blp.response(204)
    @blp.alt_response(404, response="DEFAULT_ERROR")
    @blp.alt_response(409, response="DEFAULT_ERROR")
    def delete(self, limit_name):
        """Delete a limit none of whose IDs is pending (409 says how many are)"""
        services.delete_limit(limit_name)


@blp.route("/<limit:limit_name>/events/")
class LimitEvents(MethodView):
    @blp.doc(operationId="list_limit_events")
    @blp.etag
    @blp.response(200, LimitEventSchema(many=True))
    @blp.alt_response(404, response="DEFAULT_ERROR")
    @blp.paginate()
    def get(self, limit_name, pagination_parameters):
        """List the changes of a limit's learned rate, newest first: when, why, from what
        rate to what, and how many IDs each re-plan moved"""
        page, pagination_parameters.item_count = services.list_events(
            limit_name, *page_window(pagination_parameters)
        )
        return page
