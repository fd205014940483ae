"""/celery_ids_tasks/: submit IDs, follow a task, change or cancel it."""

from flask.views import MethodView

from .. import tasks
from ..errors import ServiceBlueprint, require_content_type
from ..schemas import TaskAcceptedSchema, TaskIdSchema, TaskSchema, TaskSubmitSchema

blp = ServiceBlueprint("tasks", __name__, url_prefix="/celery_ids_tasks", description="ID tasks")


@blp.before_request
def _json_bodies_only():
    require_content_type("application/json")


def _changes(fields: dict) -> dict:
    # Both ID forms arrive as one list of integers.
    ids = fields.pop("payload", None) or fields.pop("ids", None)
    return fields if ids is None else {**fields, "ids": ids}


@blp.route("/")
class Tasks(MethodView):
    @blp.response(200, TaskSchema(many=True))
    @blp.paginate()
    def get(self, pagination_parameters):
        """List ID tasks, newest first"""
        page, pagination_parameters.item_count = tasks.list_tasks(
            pagination_parameters.first_item, pagination_parameters.page_size
        )
        return page

    @blp.arguments(TaskSubmitSchema)
    @blp.response(202, TaskAcceptedSchema)
    @blp.alt_response(413, response="DEFAULT_ERROR")
    def post(self, fields):
        """Submit IDs; planning runs on a worker"""
        return tasks.submit_task(**_changes(fields))


@blp.route("/<id:task_id>/")
class TaskById(MethodView):
    @blp.response(200, TaskSchema)
    @blp.alt_response(404, response="DEFAULT_ERROR")
    def get(self, task_id):
        """Read a task with its status and counts"""
        return tasks.get_task(task_id)

    @blp.arguments(TaskSubmitSchema)
    @blp.response(200, TaskSchema)
    @blp.alt_response(409, response="DEFAULT_ERROR")
    def put(self, fields, task_id):
        """Replace a task's name and IDs (IDs only before any has run)"""
        return tasks.update_task(task_id, _changes(fields))

    @blp.arguments(TaskSubmitSchema(partial=True))
    @blp.response(200, TaskSchema)
    @blp.alt_response(409, response="DEFAULT_ERROR")
    def patch(self, fields, task_id):
        """Change a task's name, IDs or overflow (IDs only before any has run)"""
        return tasks.update_task(task_id, _changes(fields))

    @blp.response(204)
    @blp.alt_response(409, response="DEFAULT_ERROR")
    def delete(self, task_id):
        """Cancel a task: its pending IDs are released"""
        tasks.cancel_task(task_id)


@blp.route("/<id:task_id>/ids/")
class TaskIds(MethodView):
    @blp.response(200, TaskIdSchema(many=True))
    @blp.paginate()
    def get(self, task_id, pagination_parameters):
        """The task's IDs in submission order, with slot, status and outcome"""
        page, pagination_parameters.item_count = tasks.list_task_ids(
            task_id, pagination_parameters.first_item, pagination_parameters.page_size
        )
        return page
