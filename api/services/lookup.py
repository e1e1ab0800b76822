"""Owner-checked look-ups by id: another owner's row is answered exactly like a missing one (docs/architecture.md §9)."""

from __future__ import annotations

from typing import TypeVar

from sqlalchemy.orm import Session

from api.errors import not_found
from models.tables import Artifact, Dataset, Job, Model

Owned = TypeVar("Owned", Model, Dataset, Job, Artifact)


def find_owned(session: Session, table: type[Owned], owner: str, ident: str, *, fresh: bool = False) -> Owned | None:
    """The owner's ``table`` row with id ``ident``, else None; ``fresh`` re-reads a row the session holds."""
    row = session.get(table, ident, populate_existing=fresh)
    return row if row is not None and row.owner == owner else None


def get_owned(session: Session, table: type[Owned], owner: str, ident: str, *, fresh: bool = False) -> Owned:
    """The owner's ``table`` row with id ``ident``, else a 404 that never says whether someone else has it."""
    row = find_owned(session, table, owner, ident, fresh=fresh)
    if row is None:
        raise not_found(table.__name__.lower(), ident)
    return row
