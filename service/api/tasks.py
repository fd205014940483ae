"""/celery_ids_tasks/: submit IDs, follow a task, change or cancel it."""

from flask import current_app, request
from flask.views import MethodView

from .. import id_tasks
from ..ids import stream_ids
from ..schemas import (
    TaskAcceptedSchema,
    TaskIdSchema,
    TaskIdsQuerySchema,
    TaskSchema,
    TaskSubmitSchema,
    TaskSummarySchema,
    TextSubmitQuerySchema,
)
from .base import ServiceBlueprint, require_content_type

blp = ServiceBlueprint("tasks", __name__, url_prefix="/celery_ids_tasks", description="ID tasks")

JSON = "application/json"
TEXT_TYPES = ("text/csv", "text/plain")
# A text body may hold this many bytes per allowed ID: 19 digits and a separator or two.
TEXT_BYTES_PER_ID = 21

TEXT_BODY = {
    "schema": {"type": "string", "example": "1,2,3\n4 5 6"},
}
SUBMISSION_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            JSON: {"schema": {"$ref": "#/components/schemas/TaskSubmit"}},
            "text/csv": TEXT_BODY,
            "text/plain": TEXT_BODY,
        },
    },
    "parameters": [
        {
            "in": "query",
            "name": "task_name",
            "schema": {"type": "string"},
            "description": "required with a text body",
        },
        {
            "in": "query",
            "name": "overflow",
            "schema": {"type": "string", "enum": ["spread", "defer"]},
            "description": "with a text body",
        },
    ],
}


@blp.before_request
def _known_body_types():
    if request.endpoint == "tasks.Tasks":
        require_content_type(JSON, *TEXT_TYPES)
    else:
        require_content_type(JSON)


def _changes(fields: dict) -> dict:
    # Both JSON forms of the IDs arrive as one list of integers.
    ids = fields.pop("payload", None) or fields.pop("ids", None)
    return fields if ids is None else {**fields, "ids": ids}


def _submission() -> dict:
    """A JSON body, or IDs as text streamed from the body with the rest in the query."""
    parser = blp.ARGUMENTS_PARSER
    if request.mimetype in TEXT_TYPES:
        fields = parser.parse(TextSubmitQuerySchema(), location="query")
        request.max_content_length = current_app.config["MAX_IDS_PER_TASK"] * TEXT_BYTES_PER_ID
        return {**fields, "ids": stream_ids(request.stream)}
    return _changes(parser.parse(TaskSubmitSchema(), location="json"))


@blp.route("/")
class Tasks(MethodView):
    @blp.response(200, TaskSummarySchema(many=True))
    @blp.paginate()
    def get(self, pagination_parameters):
        """List ID tasks, newest first; each task's payload is on its own page"""
        page, pagination_parameters.item_count = id_tasks.list_tasks(
            pagination_parameters.first_item, pagination_parameters.page_size
        )
        return page

    @blp.doc(**SUBMISSION_DOC)
    @blp.response(202, TaskAcceptedSchema)
    @blp.alt_response(413, response="DEFAULT_ERROR")
    @blp.alt_response(415, response="DEFAULT_ERROR")
    @blp.alt_response(422, response="DEFAULT_ERROR")
    def post(self):
        """Submit IDs as JSON, or as a text/csv body; planning runs on a worker"""
        return id_tasks.submit_task(**_submission())


@blp.route("/<id:task_id>/")
class TaskById(MethodView):
    @blp.response(200, TaskSchema)
    @blp.alt_response(404, response="DEFAULT_ERROR")
    def get(self, task_id):
        """Read a task with its status and counts"""
        return id_tasks.get_task(task_id)

    @blp.arguments(TaskSubmitSchema)
    @blp.response(200, TaskSchema)
    @blp.alt_response(409, response="DEFAULT_ERROR")
    def put(self, fields, task_id):
        """Replace a task's name, IDs and overflow (new IDs only before any has run)"""
        return id_tasks.replace_task(task_id, _changes(fields))

    @blp.arguments(TaskSubmitSchema(partial=True))
    @blp.response(200, TaskSchema)
    @blp.alt_response(409, response="DEFAULT_ERROR")
    def patch(self, fields, task_id):
        """Change a task's name, IDs or overflow (IDs only before any has run)"""
        return id_tasks.update_task(task_id, _changes(fields))

    @blp.response(204)
    @blp.alt_response(409, response="DEFAULT_ERROR")
    def delete(self, task_id):
        """Cancel a task: its pending IDs leave the plan"""
        id_tasks.cancel_task(task_id)


@blp.route("/<id:task_id>/ids/")
class TaskIds(MethodView):
    @blp.arguments(TaskIdsQuerySchema, location="query")
    @blp.response(200, TaskIdSchema(many=True))
    @blp.paginate()
    def get(self, query, task_id, pagination_parameters):
        """The task's IDs in submission order, with slot, status and outcome"""
        page, pagination_parameters.item_count = id_tasks.list_task_ids(
            task_id, pagination_parameters.first_item, pagination_parameters.page_size, **query
        )
        return page
