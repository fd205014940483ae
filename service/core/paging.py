"""Pages of a table, newest first, with the number of rows in all."""

from __future__ import annotations

from sqlalchemy import func, select

from service.core.extensions import db


def newest_first(model, offset: int, limit: int, *options) -> tuple[list, int]:
    """A page of the model's rows, newest first, and how many rows the table holds.

    The count rides along with each row of the page (PostgreSQL computes it once for the
    statement), so a page is one round trip, not two; only a page past the end, which has
    no row to carry it, asks for the count on its own.
    """
    count = select(func.count()).select_from(model)
    query = (
        select(model, count.scalar_subquery())
        .options(*options)
        .order_by(model.date_created.desc(), model.id.desc())
        .offset(offset)
        .limit(limit)
    )
    rows = db.session.execute(query).all()
    if not rows:
        return [], db.session.scalar(count)
    return [row[0] for row in rows], rows[0][1]
