"""/slots/: the plan, minute by minute, grouped by window."""

from flask.views import MethodView

from service.planning import reading as slots
from service.web.base import ServiceBlueprint
from service.web.schemas import PlanSchema, SlotsQuerySchema

blp = ServiceBlueprint("slots", __name__, url_prefix="/slots", description="The plan")


@blp.route("/")
class Plan(MethodView):
    @blp.doc(operationId="get_plan")
    @blp.etag
    @blp.arguments(SlotsQuerySchema, location="query")
    @blp.response(200, PlanSchema)
    def get(self, query):
        """A limit's slots: load, capacity, done and failed counts, grouped by window"""
        plan = slots.plan_between(
            query.get("start"), query.get("end"), limit_name=query.get("limit")
        )
        # `now` differs in every answer: the tag follows the plan alone.
        blp.set_etag(plan, PlanSchema(exclude=("now",)))
        return plan
