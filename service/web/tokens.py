"""API tokens: named, each with a scope, stored as SHA-256 digests (table api_tokens).

Operators create, list and revoke them with `flask tokens`; the token check
(service/web/auth.py) looks up each request's token here. A revoked token's row is
deleted, so the next request that presents it is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import delete, func, select, text

from service.core.errors import Refused, not_found
from service.core.extensions import db
from service.core.models import ApiToken, TokenScope

# Narrowest first: a scope allows everything the ones before it allow.
SCOPES = tuple(TokenScope)
NAME_FORMAT = re.compile(r"[A-Za-z0-9._-]{1,64}")
# A bound on what the table (and `flask tokens list`) may hold.
MAX_TOKENS = 1000
# The name under which API_TOKEN is logged; no stored token may take it.
API_TOKEN_NAME = "API_TOKEN"
# 32 random bytes: 256 bits, as url-safe base64 (43 characters).
TOKEN_BYTES = 32
# A token's last use is written at most this often: a write per request would make
# every read a write, and a busy client's requests wait for each other on its row.
LAST_USED_EVERY_SECONDS = 60


@dataclass(frozen=True)
class Holder:
    """Who presented a token: its name (for the log) and its scope."""

    name: str
    scope: TokenScope

    def may(self, needed: TokenScope) -> bool:
        return SCOPES.index(self.scope) >= SCOPES.index(needed)


API_TOKEN_HOLDER = Holder(API_TOKEN_NAME, TokenScope.ADMIN)


@dataclass(frozen=True)
class Presented:
    """What a request's token turned out to be, and whether any token is stored."""

    holder: Holder | None
    any_stored: bool


def scopes_allowing(needed: TokenScope) -> tuple[TokenScope, ...]:
    return SCOPES[SCOPES.index(needed) :]


def digest(token: str) -> bytes:
    # A token is 256 random bits, not a password a person chose: there is no list of
    # likely ones to try, so a slow hash (bcrypt, scrypt) would add nothing but tens of
    # milliseconds to every request. SHA-256 keeps a stolen table useless and lets the
    # check find a token by its digest, with one indexed lookup.
    return hashlib.sha256(token.encode()).digest()


def create(name: str, scope: str) -> str:
    """Store a new token NAME of `scope`; the token itself is returned, and kept nowhere."""
    _check_name(name)
    scope = _scope(scope)
    token = secrets.token_urlsafe(TOKEN_BYTES)
    # Two creations at once must not both see room for one more.
    db.session.execute(text("LOCK TABLE api_tokens IN SHARE ROW EXCLUSIVE MODE"))
    if db.session.scalar(select(func.count()).select_from(ApiToken)) >= MAX_TOKENS:
        raise Refused(
            f"there are {MAX_TOKENS} tokens already, as many as a deployment may hold: "
            "revoke one first"
        )
    db.session.add(ApiToken(name=name, scope=scope, digest=digest(token)))
    db.session.commit()
    return token


def listed() -> list:
    """Every token's name, scope, creation and last use, by name; never a digest."""
    columns = (ApiToken.name, ApiToken.scope, ApiToken.created_at, ApiToken.last_used_at)
    return db.session.execute(select(*columns).order_by(ApiToken.name)).all()


def revoke(name: str) -> None:
    deleted = db.session.execute(delete(ApiToken).where(ApiToken.name == name))
    if deleted.rowcount == 0:
        raise not_found("token", repr(name))
    db.session.commit()


def _check_name(name: str) -> None:
    if not NAME_FORMAT.fullmatch(name):
        raise Refused(
            f"a token's name is 1 to 64 letters, digits, '.', '_' or '-'; got {name[:80]!r}"
        )
    if name == API_TOKEN_NAME:
        raise Refused(f"{API_TOKEN_NAME} names the token of the environment: choose another name")


def _scope(scope: str) -> TokenScope:
    try:
        return TokenScope(scope)
    except ValueError:
        raise Refused(f"no scope is named {scope!r}: {', '.join(SCOPES)}") from None


# One statement, on the digest's unique index: the token presented (if any is stored)
# and whether the table holds any token at all (a deployment that does is closed).
_LOOK_UP = text(
    "SELECT t.id, t.name, t.scope, t.digest, "
    "t.last_used_at IS NULL OR t.last_used_at < now() - make_interval(secs => :every) "
    "AS stale, EXISTS (SELECT FROM api_tokens) AS any_stored "
    "FROM (VALUES (1)) AS one LEFT JOIN api_tokens t ON t.digest = :digest"
)
# Again `stale`: of two requests that both saw a stale time, only the first writes.
_TOUCH = text(
    "UPDATE api_tokens SET last_used_at = now() WHERE id = :id "
    "AND (last_used_at IS NULL OR last_used_at < now() - make_interval(secs => :every))"
)


def look_up(token: str) -> Presented:
    """The holder of `token` ("" when none was sent), and whether any token is stored.

    On a connection of its own, outside any transaction: the request's session is left
    as it was (a GET's statements then run without one, see `_read_without_transaction`),
    and the last use commits at once, whatever the request then does.
    """
    presented = digest(token) if token else None
    with db.engine.connect() as connection:
        connection.execution_options(isolation_level="AUTOCOMMIT")
        every = {"every": LAST_USED_EVERY_SECONDS}
        row = connection.execute(_LOOK_UP, {"digest": presented, **every}).one()
        # The index compared digests, whose timing says nothing of any token; the match
        # is confirmed in constant time all the same, as API_TOKEN is.
        found = row.id is not None and hmac.compare_digest(bytes(row.digest), presented)
        if found and row.stale:
            connection.execute(_TOUCH, {"id": row.id, **every})
    holder = Holder(row.name, TokenScope(row.scope)) if found else None
    return Presented(holder, row.any_stored)
