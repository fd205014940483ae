"""/slots/: the plan, minute by minute, grouped by window."""

from flask.views import MethodView

from .. import slots
from ..schemas import PlanSchema, SlotsQuerySchema
from .base import ServiceBlueprint

blp = ServiceBlueprint("slots", __name__, url_prefix="/slots", description="The plan")


@blp.route("/")
class Plan(MethodView):
    @blp.arguments(SlotsQuerySchema, location="query")
    @blp.response(200, PlanSchema)
    def get(self, query):
        """Each slot's load, capacity, done and failed counts, grouped by window"""
        return slots.plan_between(query.get("start"), query.get("end"))
