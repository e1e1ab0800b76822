"""Cursor pagination in id order: a page is ``limit`` rows after the cursor, the cursor the last id shown."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute, Session

from api.errors import field_error

DEFAULT_LIMIT = 20
MAX_LIMIT = 100

Row = TypeVar("Row")


def check_limit(limit: int, maximum: int = MAX_LIMIT) -> int:
    """A page size within 1..``maximum``, else 422 naming ``limit``."""
    if not 1 <= limit <= maximum:
        raise field_error(422, "validation_error", "limit", f"must be between 1 and {maximum}")
    return limit


def paginate(
    session: Session,
    query: Select[Row],
    key: InstrumentedAttribute[Any],
    after: Any,
    limit: int,
    *,
    newest_first: bool = True,
    max_limit: int = MAX_LIMIT,
) -> tuple[list[Row], Any]:
    """One page of ``query`` ordered by ``key`` (descending when ``newest_first``), starting past ``after``.

    Returns the rows and the cursor for the next page: the last row's ``key`` when more rows follow, else None.
    """
    check_limit(limit, max_limit)
    if after:
        query = query.where(key < after if newest_first else key > after)
    rows = list(session.scalars(query.order_by(key.desc() if newest_first else key).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (getattr(rows[-1], key.key) if more and rows else None)
