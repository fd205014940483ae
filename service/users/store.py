"""Users: created by hand over the API, or by the processor for each ID it handles."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from service.core.errors import Conflict, not_found
from service.core.extensions import db
from service.core.models import MAX_ID, User
from service.core.paging import newest_first

# Tries at the next free id before a create without an id gives up with 409.
NEXT_ID_ATTEMPTS = 5


def list_users(offset: int, limit: int) -> tuple[list[User], int]:
    return newest_first(User, offset, limit)


def get_user(user_id: int) -> User:
    user = db.session.get(User, user_id)
    if user is None:
        raise not_found("user", user_id)
    return user


def create_user(fields: dict) -> User:
    """Create a user; one without an id takes the next above the largest."""
    if "id" not in fields:
        return _create_with_next_free_id(fields)
    user = User(**fields)
    db.session.add(user)
    db.session.commit()  # a taken id is refused by PostgreSQL and answered 409
    return user


def _create_with_next_free_id(fields: dict) -> User:
    # IDs also come from tasks and from clients, far apart, so a sequence would walk into
    # them; the next one above the largest is free unless a concurrent create took it.
    for _ in range(NEXT_ID_ATTEMPTS):
        largest = db.session.scalar(select(func.max(User.id))) or 0
        if largest >= MAX_ID:
            raise Conflict(f"no id is left above {largest}: give the user an id")
        user = User(id=largest + 1, **fields)
        try:
            with db.session.begin_nested():
                db.session.add(user)
        except IntegrityError:
            continue
        db.session.commit()
        return user
    raise Conflict("ids are being taken concurrently: try again")


def update_user(user_id: int, fields: dict) -> User:
    user = get_user(user_id)
    for name, value in fields.items():
        setattr(user, name, value)
    db.session.commit()
    return user


def delete_user(user_id: int) -> None:
    db.session.delete(get_user(user_id))
    db.session.commit()
