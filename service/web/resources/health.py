"""/healthz and /readyz: probes for load balancers and orchestrators, open without a token."""

from flask.views import MethodView
from flask_smorest import abort

from service.ops import health
from service.web.base import ServiceBlueprint
from service.web.schemas import LivenessSchema, NotReadySchema, ReadinessSchema

blp = ServiceBlueprint("health", __name__, description="Liveness and readiness probes")


@blp.route("/healthz")
class Liveness(MethodView):
    @blp.doc(operationId="check_liveness", security=[])
    @blp.response(200, LivenessSchema)
    def get(self):
        """The process answers; nothing else is touched"""
        return {"status": "ok"}


@blp.route("/readyz")
class Readiness(MethodView):
    @blp.doc(operationId="check_readiness", security=[])
    @blp.response(200, ReadinessSchema)
    @blp.alt_response(503, schema=NotReadySchema, description="A check failed")
    def get(self):
        """PostgreSQL and Redis answer within 2 s and the schema is at the migrations' head"""
        readiness = health.readiness()
        if readiness.failed:
            abort(503, message=f"not ready: {', '.join(readiness.failed)}", errors=readiness.failed)
        return readiness
