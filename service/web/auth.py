"""Who may do what: the scope each request needs, the token check, and how the OpenAPI
document states both.

A deployment with API_TOKEN set, or with any token stored (`flask tokens create`),
needs a token on every path but the public ones; with neither it is open. API_TOKEN is
an admin token, logged as `API_TOKEN`. Stored tokens are looked up on every request
(one indexed statement, no cache), so a revoked one is refused from the next request on.
"""

from __future__ import annotations

import hmac

from apispec import BasePlugin
from flask import current_app, g, request
from flask_smorest import abort

from service.core.models import TokenScope
from service.web import tokens

# Paths readable without a token: they describe the API or probe its health, and hold
# no data.
PUBLIC_ENDPOINTS = {
    "root.Root",
    "api-docs.openapi_json",
    "api-docs.openapi_swagger_ui",
    "swagger_ui.static",
    "static",
    "health.Liveness",
    "health.Readiness",
}
READING_METHODS = {"GET", "HEAD", "OPTIONS"}
# The blueprints whose changes a `submit` token may make: users, tasks and previews.
SUBMITTING_BLUEPRINTS = {"users", "tasks"}
# rq-dashboard can requeue and delete jobs, even by GET: admin only, as a whole.
DASHBOARD = "rq_dashboard"
# A browser that receives this asks for a user name and password: any name, the
# token as the password, which lets it open /plan and /rq.
ASK_FOR_THE_TOKEN = {"WWW-Authenticate": 'Basic realm="slotted"'}


def needed_scope(method: str, endpoint: str | None) -> TokenScope | None:
    """The scope a request needs; None for a public path.

    A change that no rule names (limits, and whatever is added later) needs `admin`. A
    request that matches no route needs only a valid token: its answer is a 404 or 405.
    """
    if endpoint in PUBLIC_ENDPOINTS:
        return None
    blueprint = endpoint.rpartition(".")[0] if endpoint else None
    if blueprint == DASHBOARD:
        return TokenScope.ADMIN
    if method in READING_METHODS or endpoint is None:
        return TokenScope.READ
    if blueprint in SUBMITTING_BLUEPRINTS:
        return TokenScope.SUBMIT
    return TokenScope.ADMIN


def require_token() -> None:
    """Refuse a request without a valid token (401) or whose token's scope is too
    narrow (403); the token's name goes to the request's log line."""
    needed = needed_scope(request.method, request.endpoint)
    if needed is None:
        return
    guarded, holder = _identify(_presented_token())
    if not guarded:
        return
    if holder is None:
        abort(
            401,
            message="a valid API token is required: 'Authorization: Bearer <token>'",
            headers=ASK_FOR_THE_TOKEN,
        )
    g.token_name = holder.name
    if not holder.may(needed):
        allowed = _either(needed, quote="'")
        abort(
            403,
            message=f"this request needs a token of scope {allowed}; "
            f"the token '{holder.name}' has scope '{holder.scope}'",
        )


def _identify(presented: str) -> tuple[bool, tokens.Holder | None]:
    """Whether the deployment needs a token, and who holds the one presented."""
    expected = current_app.config.get("API_TOKEN")
    if expected and hmac.compare_digest(presented.encode(), expected.encode()):
        return True, tokens.API_TOKEN_HOLDER
    if expected and not presented:
        return True, None
    found = tokens.look_up(presented)
    return bool(expected) or found.any_stored, found.holder


def _presented_token() -> str:
    auth = request.authorization
    if auth is None:
        return ""
    return (auth.password if auth.type == "basic" else auth.token) or ""


SECURITY_SCHEMES = {
    "bearerToken": {"type": "http", "scheme": "bearer"},
    "basicToken": {
        "type": "http",
        "scheme": "basic",
        "description": "any user name, the token as the password (browsers)",
    },
}
# Either scheme will do; OpenAPI 3.0 lists scopes for oauth2 only, so each operation
# states its scope in `x-scope` and in its description.
SECURITY = [{name: []} for name in SECURITY_SCHEMES]


class ScopesPlugin(BasePlugin):
    """Declares the token schemes, and on each operation that needs a token: the
    requirement, its scope, and the 401 and 403 it may answer."""

    def init_spec(self, spec) -> None:
        super().init_spec(spec)
        for name, scheme in SECURITY_SCHEMES.items():
            spec.components.security_scheme(name, scheme)

    def operation_helper(self, path=None, operations=None, **kwargs) -> None:
        endpoint = kwargs["rule"].endpoint
        for method, operation in operations.items():
            needed = needed_scope(method.upper(), endpoint)
            if needed is not None:
                _document_scope(operation, needed)


def _either(needed: TokenScope, quote: str) -> str:
    """The scopes that allow `needed`, in words: 'submit' or 'admin'."""
    *wider, widest = [f"{quote}{scope}{quote}" for scope in tokens.scopes_allowing(needed)]
    return f"{', '.join(wider)} or {widest}" if wider else widest


def _document_scope(operation: dict, needed: TokenScope) -> None:
    sentence = f"Needs a token of scope {_either(needed, quote='`')}."
    described = operation.get("description")
    operation["description"] = f"{described}\n\n{sentence}" if described else sentence
    operation["security"] = [dict(requirement) for requirement in SECURITY]
    operation["x-scope"] = str(needed)
    responses = operation.setdefault("responses", {})
    responses.setdefault(401, "DEFAULT_ERROR")
    responses.setdefault(403, "DEFAULT_ERROR")
