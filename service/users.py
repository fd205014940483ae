"""Users: created by hand over the API, or by the processor for each ID it handles."""

from __future__ import annotations

from sqlalchemy import func, select, text

from .errors import not_found
from .extensions import db
from .models import User


def list_users(offset: int, limit: int) -> tuple[list[User], int]:
    query = select(User).order_by(User.date_created.desc(), User.id.desc())
    users = db.session.scalars(query.offset(offset).limit(limit)).all()
    return users, db.session.scalar(select(func.count()).select_from(User))


def get_user(user_id: int) -> User:
    user = db.session.get(User, user_id)
    if user is None:
        raise not_found("user", user_id)
    return user


def create_user(fields: dict) -> User:
    user = User(**fields)
    db.session.add(user)
    db.session.flush()
    if "id" in fields:
        advance_id_sequence()
    db.session.commit()
    return user


def update_user(user_id: int, fields: dict) -> User:
    user = get_user(user_id)
    for name, value in fields.items():
        setattr(user, name, value)
    db.session.commit()
    return user


def delete_user(user_id: int) -> None:
    db.session.delete(get_user(user_id))
    db.session.commit()


def advance_id_sequence() -> None:
    """Keep the id sequence past every existing user, only ever forward.

    Users also get explicit IDs (by hand, or received in tasks); without this, a later
    user created without an ID could be handed one that is taken.
    """
    db.session.execute(
        text(
            "SELECT setval('users_id_seq', highest) "
            "FROM (SELECT max(id) AS highest FROM users) AS m "
            "WHERE highest > (SELECT last_value FROM users_id_seq)"
        )
    )
