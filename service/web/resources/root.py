"""The API root: where everything is."""

from flask import url_for
from flask.views import MethodView

from service.web.base import ServiceBlueprint

blp = ServiceBlueprint("root", __name__, description="Links to every collection")


@blp.route("/")
class Root(MethodView):
    @blp.doc(operationId="get_root", security=[])
    @blp.response(200)
    def get(self):
        """Links to every collection and to the docs"""
        return {
            "users": url_for("users.Users", _external=True),
            "celery_ids_tasks": url_for("tasks.Tasks", _external=True),
            "slots": url_for("slots.Plan", _external=True),
            "limits": url_for("limits.Limits", _external=True),
            "plan": url_for("pages.plan", _external=True),
            "docs": url_for("api-docs.openapi_swagger_ui", _external=True),
            "openapi": url_for("api-docs.openapi_json", _external=True),
            "rq": url_for("rq_dashboard.queues_overview", _external=True),
        }
