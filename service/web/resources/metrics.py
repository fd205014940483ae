"""/metrics: for Prometheus, which sends a token (scope `read`) as a bearer token."""

from flask import Response
from flask.views import MethodView

from service.ops import metrics
from service.web.base import ServiceBlueprint

blp = ServiceBlueprint("metrics", __name__, description="Prometheus metrics")


@blp.route("/metrics")
class Metrics(MethodView):
    @blp.doc(operationId="get_metrics")
    @blp.response(
        200,
        {"type": "string"},
        content_type="text/plain",
        description="Prometheus text format 0.0.4",
    )
    def get(self):
        """Requests by route and status, IDs by status, slot lateness, window load, queues"""
        return Response(metrics.exposition(), content_type=metrics.CONTENT_TYPE)
