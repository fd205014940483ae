"""/users/: the users received by IDs, and those created by hand."""

from flask.views import MethodView

from service.users import store as users
from service.web.base import ServiceBlueprint, page_window, require_content_type
from service.web.idempotency import OPENAPI_PARAMETER, OPENAPI_RESPONSE_HEADERS, idempotent
from service.web.schemas import UserCreateSchema, UserSchema, UserUpdateSchema

blp = ServiceBlueprint("users", __name__, url_prefix="/users", description="Users")


@blp.before_request
def _json_bodies_only():
    require_content_type("application/json")


@blp.route("/")
class Users(MethodView):
    @blp.doc(operationId="list_users")
    @blp.etag
    @blp.response(200, UserSchema(many=True))
    @blp.paginate()
    def get(self, pagination_parameters):
        """List users, newest first"""
        page, pagination_parameters.item_count = users.list_users(
            *page_window(pagination_parameters)
        )
        return page

    @blp.doc(operationId="create_user", parameters=[OPENAPI_PARAMETER])
    @idempotent
    @blp.arguments(UserCreateSchema)
    @blp.response(201, UserSchema, headers=OPENAPI_RESPONSE_HEADERS)
    @blp.alt_response(400, response="DEFAULT_ERROR")
    @blp.alt_response(409, description="A user with that id exists")
    def post(self, fields):
        """Create a user"""
        return users.create_user(fields)


@blp.route("/<id:user_id>/")
class UserById(MethodView):
    @blp.doc(operationId="get_user")
    @blp.etag
    @blp.response(200, UserSchema)
    @blp.alt_response(404, response="DEFAULT_ERROR")
    def get(self, user_id):
        """Read a user"""
        return users.get_user(user_id)

    @blp.doc(operationId="replace_user")
    @blp.arguments(UserUpdateSchema)
    @blp.response(200, UserSchema)
    @blp.alt_response(404, response="DEFAULT_ERROR")
    def put(self, fields, user_id):
        """Replace a user's fields"""
        return users.update_user(user_id, fields)

    @blp.doc(operationId="update_user")
    @blp.arguments(UserUpdateSchema(partial=True))
    @blp.response(200, UserSchema)
    @blp.alt_response(404, response="DEFAULT_ERROR")
    def patch(self, fields, user_id):
        """Update some of a user's fields"""
        return users.update_user(user_id, fields)

    @blp.doc(operationId="delete_user")
    @blp.response(204)
    @blp.alt_response(404, response="DEFAULT_ERROR")
    def delete(self, user_id):
        """Delete a user"""
        users.delete_user(user_id)
