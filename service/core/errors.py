"""Domain errors: refusals that a client or an operator can act on.

Domain code raises these and nothing HTTP; the web layer maps each kind to its answer
in one place (service/web/errors.py), and the CLI and the jobs catch them as they are.
"""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError


class DomainError(Exception):
    """A refusal with a message, and `errors`: what was wrong, field by field."""

    def __init__(self, message: str, errors: dict | None = None):
        super().__init__(message)
        self.message = message
        self.errors = errors or {}


class NotFound(DomainError):
    """What the request names does not exist."""


class Conflict(DomainError):
    """The request contradicts the state of what it names (a task that has run, a
    limit that holds pending IDs, a name taken)."""


class Gone(DomainError):
    """What the request names existed, and has been removed for good (retention)."""


class Refused(DomainError):
    """The request's content is refused: a value, a field, a processor."""


class TooLarge(Refused):
    """The request holds more than a limit allows."""


def not_found(what: str, ident) -> NotFound:
    return NotFound(f"{what} {ident} does not exist")


UNIQUE_VIOLATION = "23505"
# What each uniqueness constraint means to a client.
CONFLICT_MESSAGES = {
    "pk_users": "a user with this id already exists",
    "uq_limits_name": "a limit with this name already exists",
    "uq_api_tokens_name": "a token with this name already exists",
}


def unique_violation(error: IntegrityError) -> Conflict | None:
    """The Conflict that PostgreSQL's refusal of a duplicate means, or None when the
    integrity error is another (a NOT NULL or foreign key refused: a bug)."""
    if getattr(error.orig, "sqlstate", None) != UNIQUE_VIOLATION:
        return None
    constraint = getattr(getattr(error.orig, "diag", None), "constraint_name", None)
    return Conflict(
        CONFLICT_MESSAGES.get(constraint, f"conflicts with an existing record ({constraint})")
    )
