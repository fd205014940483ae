"""/celery_ids_tasks/: submit IDs, follow a task, change or cancel it."""

from flask import current_app, request
from flask.views import MethodView

from service.planning import horizon, preview
from service.tasks import services as tasks
from service.tasks import store as task_store
from service.tasks.ids import IDS_BODY_PATTERN, stream_ids
from service.web.base import ServiceBlueprint, page_window, require_content_type
from service.web.idempotency import OPENAPI_PARAMETER, OPENAPI_RESPONSE_HEADERS, idempotent
from service.web.schemas import (
    PreviewSchema,
    TaskAcceptedSchema,
    TaskIdSchema,
    TaskIdsQuerySchema,
    TaskSchema,
    TaskSubmitSchema,
    TaskSummarySchema,
    TextSubmitQuerySchema,
)

blp = ServiceBlueprint("tasks", __name__, url_prefix="/celery_ids_tasks", description="ID tasks")

JSON = "application/json"
TEXT_TYPES = ("text/csv", "text/plain")
# A text body may hold this many bytes per allowed ID: 19 digits and a separator or two.
TEXT_BYTES_PER_ID = 21

TEXT_BODY = {
    "schema": {"type": "string", "pattern": IDS_BODY_PATTERN, "example": "1,2,3\n4 5 6"},
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
    # Drawn from the schema that parses the query, so that it documents what the server reads.
    "parameters": [{"in": "query", "schema": TextSubmitQuerySchema}],
}


# The endpoints that take IDs as a text body too.
TEXT_ENDPOINTS = ("tasks.Tasks", "tasks.TaskPreview")


@blp.before_request
def _known_body_types():
    if request.endpoint in TEXT_ENDPOINTS:
        require_content_type(JSON, *TEXT_TYPES)
        if request.mimetype in TEXT_TYPES:
            # Set before anything opens the body's stream, which takes the limit then.
            limit = current_app.config["MAX_IDS_PER_TASK"] * TEXT_BYTES_PER_ID
            request.max_content_length = limit
    else:
        require_content_type(JSON)


def _changes(fields: dict) -> dict:
    # Both JSON forms of the IDs arrive as one list of integers.
    ids = fields.pop("payload", None) or fields.pop("ids", None)
    return fields if ids is None else {**fields, "ids": ids}


def _submission() -> dict:
    """A JSON body, or IDs as text streamed from the body with the rest in the query."""
    parser = blp.ARGUMENTS_PARSER
    # The query is checked whatever the body, so that no malformed request goes through.
    fields = parser.parse(TextSubmitQuerySchema(), location="query")
    # Without header=true a first line holding no digit is still taken for a header: it
    # could not be IDs anyway.
    header = fields.pop("header") or None
    if request.mimetype in TEXT_TYPES:
        return {**fields, "ids": stream_ids(request.stream, header=header)}
    return _changes(parser.parse(TaskSubmitSchema(), location="json"))


def _header_skipped(ids) -> str | None:
    """The header line a text body began with, once its IDs are read; None for JSON."""
    return getattr(ids, "header_skipped", None)


class _Accepted:
    """A task as the answer to its submission shows it: with the header skipped."""

    def __init__(self, task, header_skipped: str | None):
        self._task = task
        self.header_skipped = header_skipped

    def __getattr__(self, name):
        return getattr(self._task, name)


def _takes_a_submission(operation_id: str, *more_parameters):
    """Documents a view that takes a new task's body, and the answers that refuse one."""
    parameters = [*SUBMISSION_DOC["parameters"], *more_parameters]
    doc = {**SUBMISSION_DOC, "operationId": operation_id, "parameters": parameters}

    def document(view):
        for status in (413, 415, 422):
            view = blp.alt_response(status, response="DEFAULT_ERROR")(view)
        return blp.doc(**doc)(view)

    return document


@blp.route("/")
class Tasks(MethodView):
    @blp.doc(operationId="list_tasks")
    @blp.etag
    @blp.response(200, TaskSummarySchema(many=True))
    @blp.paginate()
    def get(self, pagination_parameters):
        """List ID tasks, newest first; each task's payload is on its own page"""
        page, pagination_parameters.item_count = task_store.list_tasks(
            *page_window(pagination_parameters)
        )
        return page

    @_takes_a_submission("submit_task", OPENAPI_PARAMETER)
    @idempotent
    @blp.response(202, TaskAcceptedSchema, headers=OPENAPI_RESPONSE_HEADERS)
    @blp.alt_response(400, response="DEFAULT_ERROR")
    @blp.alt_response(409, response="DEFAULT_ERROR")
    def post(self):
        """Submit IDs as JSON, or as a text/csv body; planning runs on a worker"""
        fields = _submission()
        task = tasks.submit_task(**fields, admit=horizon.admit)
        return _Accepted(task, _header_skipped(fields["ids"]))


@blp.route("/preview")
class TaskPreview(MethodView):
    @_takes_a_submission("preview_task")
    @blp.response(200, PreviewSchema)
    def post(self):
        """Where the IDs of a task would land if it were submitted now; stores nothing"""
        fields = _submission()
        del fields["task_name"]  # a preview names nothing
        plan = preview.preview_plan(**fields)
        return {**plan, "header_skipped": _header_skipped(fields["ids"])}


@blp.route("/<id:task_id>/")
class TaskById(MethodView):
    @blp.doc(operationId="get_task")
    @blp.etag
    @blp.response(200, TaskSchema)
    @blp.alt_response(404, response="DEFAULT_ERROR")
    def get(self, task_id):
        """Read a task with its status and counts"""
        return task_store.get_task(task_id)

    @blp.doc(operationId="replace_task")
    @blp.arguments(TaskSubmitSchema)
    @blp.response(200, TaskSchema)
    @blp.alt_response(409, response="DEFAULT_ERROR")
    @blp.alt_response(404, response="DEFAULT_ERROR")
    def put(self, fields, task_id):
        """Replace a task's name, IDs and overflow (new IDs only before any has run)"""
        return tasks.replace_task(task_id, _changes(fields), horizon.admit)

    @blp.doc(operationId="update_task")
    @blp.arguments(TaskSubmitSchema(partial=True))
    @blp.response(200, TaskSchema)
    @blp.alt_response(409, response="DEFAULT_ERROR")
    @blp.alt_response(404, response="DEFAULT_ERROR")
    def patch(self, fields, task_id):
        """Change a task's name, IDs or overflow (IDs only before any has run)"""
        return tasks.update_task(task_id, _changes(fields), horizon.admit)

    @blp.doc(operationId="cancel_task")
    @blp.response(204)
    @blp.alt_response(409, response="DEFAULT_ERROR")
    @blp.alt_response(404, response="DEFAULT_ERROR")
    def delete(self, task_id):
        """Cancel a task: its pending IDs leave the plan"""
        tasks.cancel_task(task_id)


@blp.route("/<id:task_id>/ids/")
class TaskIds(MethodView):
    @blp.doc(operationId="list_task_ids")
    @blp.etag
    @blp.arguments(TaskIdsQuerySchema, location="query")
    @blp.response(200, TaskIdSchema(many=True))
    @blp.paginate()
    @blp.alt_response(404, response="DEFAULT_ERROR")
    @blp.alt_response(410, response="DEFAULT_ERROR", description="removed after RETENTION_DAYS")
    def get(self, query, task_id, pagination_parameters):
        """The task's IDs in submission order, with slot, status and outcome"""
        page, pagination_parameters.item_count = tasks.list_task_ids(
            task_id, *page_window(pagination_parameters), **query
        )
        return page
